"""Dense FFN -> experts: split strategies, router inits, calibration, the streaming converter.

``from moekit.upcycle import UpcycleConfig, upcycle``; in memory, one layer at a
time: ``split_layer(FFN(gate, up, down), stats, SplitSpec(...), seed)``.
"""

from moekit.upcycle.config import UpcycleConfig

_LAZY = {  # lazy: these import torch
    "upcycle": "moekit.upcycle.convert",
    "split_layer": "moekit.upcycle.split",
    "SplitSpec": "moekit.upcycle.split",
    "FFN": "moekit.upcycle.strategies",
    "Calibrator": "moekit.upcycle.calibration",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["UpcycleConfig", *_LAZY]
