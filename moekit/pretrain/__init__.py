"""Continued pretraining of upcycled MoE models (``moekit pretrain``).

``from moekit.pretrain import PretrainConfig, pretrain``
"""

from moekit.pretrain.config import PretrainConfig, Source


def __getattr__(name):
    if name in ("pretrain", "PretrainResult"):  # lazy: the runner imports the training stack
        from moekit.pretrain import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["PretrainConfig", "PretrainResult", "Source", "pretrain"]
