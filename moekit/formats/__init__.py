"""One writer per stock architecture. ``choose_format`` explains every refusal."""

from __future__ import annotations

from moekit.errors import UnsupportedModelError
from moekit.formats.base import MoeFormat, MoeLayout
from moekit.formats.mixtral import MixtralFormat
from moekit.formats.qwen2_moe import Qwen2MoeFormat
from moekit.registry import Registry

FORMATS: Registry[MoeFormat] = Registry("format", "--format")
FORMATS.register("mixtral", MixtralFormat())
FORMATS.register("qwen2_moe", Qwen2MoeFormat())


def choose_format(name: str, src, layout: MoeLayout) -> MoeFormat:
    """The named format if it can hold this model and layout, else an error with every format's reason."""
    fmt = FORMATS.get(name)
    explain: list[str] = []
    if fmt.supports(src, layout, explain):
        return fmt
    others = []
    for other in FORMATS.names():
        if other != name and FORMATS.get(other).supports(src, layout, others_explain := []):
            others.append(other)
        elif other != name:
            explain.extend(others_explain)
    hint = f"use --format {others[0]}" if others else "moekit converts LLaMA/Mistral (no sliding window) models"
    raise UnsupportedModelError(f"cannot write this model as {name}: {'; '.join(explain)} — {hint}")


__all__ = ["FORMATS", "MoeFormat", "MoeLayout", "choose_format"]
