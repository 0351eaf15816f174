"""Evaluation: perplexity (and, for MoE models, expert-load statistics)."""

from moekit.eval.perplexity import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
