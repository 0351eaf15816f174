"""Where one input's tensor comes from, read a block of rows at a time.

A merged tensor is produced in row blocks: rows [a, b) of the tensor viewed as
2-D ``[rows, cols]`` (cols = product of the trailing dims) are read from every
input, combined, and written into the output tensor. An input's rows are the
stored rows (:class:`Block`), or a PEFT adapter's replacement, plus any LoRA
deltas (:class:`LowRank`) computed for just those rows.

Legend: E experts, R LoRA rank, O out features, N in features, V vocabulary, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.io.index import TensorInfo


@dataclass(frozen=True)
class Block:
    """Rows [start, start + rows) of a stored tensor viewed as 2-D ``[-1, cols]``."""

    info: TensorInfo
    start: int
    rows: int
    cols: int


def whole(info: TensorInfo) -> Block:
    rows = info.shape[0] if info.shape else 1
    numel = 1
    for d in info.shape:
        numel *= d
    return Block(info, 0, rows, numel // rows if rows else 0)


@dataclass(frozen=True)
class LowRank:
    """A LoRA delta ``scale · B @ A`` restricted to one stored tensor.

    kind ``linear``: A_RN, B_OR, the tensor is ``[O, N]`` (or rows row_offset.. of it).
    kind ``embedding``: A_RV, B_DR, the tensor is ``[V, D]`` = (B @ A)ᵀ.
    kind ``experts``: a PEFT ``target_parameters`` LoRA on a fused ``[E, O, N]`` parameter,
    A stored as ``[E·R, N]`` (expert-major) and B as ``[O, R·E]`` (rank-major). With
    ``expert`` set the stored tensor is rows row_offset.. of that expert's ``[O, N]``
    (legacy per-expert keys); without it, the fused tensor itself.
    """

    a: str
    b: str
    scale: float
    kind: str = "linear"
    experts: int = 1
    expert: int | None = None
    row_offset: int = 0

    def rows(self, load, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the delta as float32 ``[b - a, cols]``."""
        A, B = load(self.a).float(), load(self.b).float()
        if self.kind == "embedding":
            return self.scale * (A[:, a:b].T @ B.T)
        if self.kind == "linear":
            return self.scale * (B[self.row_offset + a:self.row_offset + b] @ A)
        E = self.experts
        A_ERN = A.reshape(E, -1, A.shape[-1])
        B_ORE = B.reshape(B.shape[0], -1, E)
        if self.expert is not None:
            e, o = self.expert, self.row_offset
            return self.scale * (B_ORE[o + a:o + b, :, e] @ A_ERN[e])
        return torch.stack([(self.scale * (B_ORE[:, :, e] @ A_ERN[e])).reshape(-1) for e in range(a, b)])


@dataclass(frozen=True)
class TensorSource:
    """One input's version of one output tensor: stored rows plus LoRA deltas."""

    block: Block
    deltas: tuple[LowRank, ...] = field(default=())


class RowReader:
    """Reads row blocks of one input as float32, keeping one weight file open.

    Like :class:`moekit.io.TensorLoader` it uses ``readinto`` at header offsets
    rather than mmap, so resident memory is the block just read, never a shard.
    ``adapter`` loads LoRA factors (small) for deltas.
    """

    def __init__(self, adapter=None):
        self.adapter = adapter
        self._path, self._fh = None, None

    def raw(self, block: Block, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of ``block`` in their stored dtype, shape ``[b - a, cols]``."""
        info = block.info
        dtype = getattr(torch, info.dtype)
        row_bytes = block.cols * dtype.itemsize
        if info.file != self._path:
            self.close()
            self._fh, self._path = open(info.file, "rb", buffering=0), info.file
        buf = torch.empty((b - a) * row_bytes, dtype=torch.uint8)
        self._fh.seek(info.offset + (block.start + a) * row_bytes)
        view, done = memoryview(buf.numpy()), 0
        while done < len(buf):  # one read() returns at most ~2 GiB on Linux
            n = self._fh.readinto(view[done:])
            if not n:
                raise OSError(f"short read of {info.name} from {info.file}")
            done += n
        return buf.view(dtype).reshape(b - a, block.cols)

    def read(self, source: TensorSource, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the input's tensor, deltas added, as float32."""
        rows = self.raw(source.block, a, b).float()
        for delta in source.deltas:
            rows = rows + delta.rows(self.adapter, a, b)
        return rows

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        self._path = self._fh = None
