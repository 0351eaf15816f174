"""LM-Cocktail model merging, streamed one tensor at a time.

``from moekit.merge import MergeConfig, merge``
"""

from moekit.merge.config import MergeConfig

_LAZY = {"merge": "moekit.merge.streaming", "plan_merge": "moekit.merge.streaming", "write_merge": "moekit.merge.streaming"}


def __getattr__(name):
    if name in _LAZY:  # lazy: the driver imports torch
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["MergeConfig", "merge", "plan_merge", "write_merge"]
