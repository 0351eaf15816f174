"""Dense FFN -> experts: split strategies, router inits, the streaming converter.

``from moekit.upcycle import UpcycleConfig, upcycle``
"""

from moekit.upcycle.config import UpcycleConfig


def __getattr__(name):
    if name == "upcycle":  # lazy: the converter imports torch
        from moekit.upcycle.convert import upcycle

        return upcycle
    raise AttributeError(name)


__all__ = ["UpcycleConfig", "upcycle"]
