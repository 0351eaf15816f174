"""moekit: dense LLaMA -> Mixture-of-Experts that stock transformers loads.

Python API: ``from moekit.upcycle import UpcycleConfig, upcycle`` (each CLI
command is one such function). Heavy imports (torch, transformers) happen on first use, so ``moekit --help`` is fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "UpcycleConfig": "moekit.upcycle.config",
    "EvalConfig": "moekit.eval.perplexity",
    "evaluate": "moekit.eval.perplexity",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
