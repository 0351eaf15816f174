"""Streams tensors into sharded safetensors inside a temporary folder.

The full list of output tensors (name, shape, dtype) is known before any data
is produced, so each shard's header is written first and tensor bytes are then
appended as they arrive: memory holds one tensor, never a shard. The folder is
renamed into place only when everything succeeded; any exception removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ConfigError, OutputExistsError

TORCH_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"max_shard_size={size!r} is not a size — use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool = False):
    """Yield a temporary folder next to ``out``; rename it to ``out`` on success.

    On any exception the temporary folder is removed and ``out`` is untouched.
    With ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists — choose another path or pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moekit-tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.moekit-old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardedWriter:
    """Writes ``plan`` (a list of :class:`TensorSpec`) as sharded safetensors in ``folder``.

    Tensors must be given to :meth:`write` in plan order; each shard's header is
    written when its first tensor arrives. Shards follow transformers' naming
    (``model.safetensors`` or ``model-00001-of-0000N.safetensors`` + index).

    Example:
        >>> plan = [TensorSpec("w", (2, 2), "float32")]
        >>> with atomic_output("out") as tmp, ShardedWriter(tmp, plan) as w:   # doctest: +SKIP
        ...     w.write("w", torch.ones(2, 2))
    """

    def __init__(self, folder: str | os.PathLike, plan: list[TensorSpec], max_shard_size: str | int = "5GB",
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_size)
        self.shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in plan:
            if self.shards[-1] and size + spec.nbytes > limit:
                self.shards.append([])
                size = 0
            self.shards[-1].append(spec)
            size += spec.nbytes
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._pos = 0  # index into plan of the next tensor expected
        self._shard = -1
        self._shard_end = 0
        # Disk writes run on one background thread (file I/O releases the GIL) so they
        # overlap with making the next tensor; the short queue bounds memory to ~3 tensors.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fh = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is not None:
                continue
            try:
                kind, payload = item
                if kind == "open":
                    if fh:
                        fh.close()
                    path, header = payload
                    fh = open(path, "wb")
                    fh.write(header)
                else:
                    fh.write(payload)
            except BaseException as e:  # re-raised in the producer's thread
                self._error = e
        if fh:
            fh.close()

    def _put(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def _open_shard(self, i: int) -> None:
        header, offset = {}, 0
        for spec in self.shards[i]:
            header[spec.name] = {"dtype": TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self._put(("open", (self.folder / self.files[i], struct.pack("<Q", len(raw)) + raw)))
        self._shard, self._shard_end = i, self._pos + len(self.shards[i])

    def write(self, name: str, tensor) -> None:
        import torch

        spec = self.plan[self._pos] if self._pos < len(self.plan) else None
        if spec is None or spec.name != name:
            raise RuntimeError(f"writer expected {spec.name if spec else 'no more tensors'}, got {name}")
        if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            raise RuntimeError(f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        if self._pos == self._shard_end or self._shard < 0:
            self._open_shard(self._shard + 1)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._put(("data", flat.view(torch.uint8).numpy().data))
        self._pos += 1

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error
        if self._pos != len(self.plan):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self.plan)} tensors")
        if len(self.files) > 1:
            weight_map = {s.name: f for f, shard in zip(self.files, self.shards) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.plan)}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self._stop()
