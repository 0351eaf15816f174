"""Opt-in reading of pickle (``.bin``) checkpoints: each shard is converted to a
temporary safetensors file, one shard in memory at a time. Pickle can run code
when loaded, which is why this needs ``--allow-pickle``."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from moekit.errors import InputError
from moekit.io.index import TensorIndex


def pickle_to_safetensors_index(folder: Path) -> TensorIndex:
    import torch
    from safetensors.torch import save_file

    shards = sorted(folder.glob("*.bin"))
    if not shards:
        raise InputError(f"no *.safetensors or *.bin weights in {folder} — point SRC at a saved model folder")
    tmp = Path(tempfile.mkdtemp(prefix="moekit-unpickled-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for i, shard in enumerate(shards):
        # weights_only=True still refuses arbitrary objects; the opt-in covers the residual risk.
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / f"part-{i:05d}.safetensors")
        del state
    return TensorIndex.from_folder(tmp)
