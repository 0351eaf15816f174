"""LoRA / QLoRA / full fine-tuning of attention, experts, routers or shared experts.

``from moekit.finetune import FinetuneConfig, finetune``
"""

from moekit.finetune.config import FinetuneConfig


def __getattr__(name):
    if name in ("finetune", "FinetuneResult"):  # lazy: the runner imports the training stack
        from moekit.finetune import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["FinetuneConfig", "finetune", "FinetuneResult"]
