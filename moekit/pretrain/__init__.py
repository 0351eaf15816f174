"""Continued pretraining of upcycled MoE models (``moekit pretrain``)."""

from moekit.pretrain.config import PretrainConfig, Source
from moekit.pretrain.run import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "Source", "pretrain"]
