"""Reads tensors one at a time, keeping at most one shard open."""

from __future__ import annotations

from collections import OrderedDict

from moekit.io.index import TensorIndex


class TensorLoader:
    """Lazy ``name -> tensor`` over a :class:`TensorIndex`.

    Each tensor is read with one ``readinto`` at the offset the safetensors header
    gives. We do not keep ``safe_open``'s mmap: every page it touches stays
    resident while the shard is open, so RSS would grow with the shard size.
    ``cache`` keeps the last few tensors read with ``cache=True`` (the default),
    because one dense FFN matrix feeds several expert tensors; tensors read once
    (embeddings, ``lm_head``, attention) pass ``cache=False`` and are not held.

    Example:
        >>> with TensorLoader(TensorIndex.from_folder(d)) as load:   # doctest: +SKIP
        ...     w = load("model.norm.weight")
    """

    def __init__(self, index: TensorIndex, cache: int = 3):
        self.index = index
        self._file = None
        self._fh = None
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache

    def __call__(self, name: str, cache: bool = True):
        import torch

        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        info = self.index[name]
        if info.file != self._file:
            self.close()
            self._fh, self._file = open(info.file, "rb", buffering=0), info.file
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._fh.seek(info.offset)
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:  # one read() returns at most ~2 GiB on Linux
            n = self._fh.readinto(view[done:])
            if not n:
                raise OSError(f"short read of {name} from {info.file}")
            done += n
        tensor = buf.view(getattr(torch, info.dtype)).reshape(info.shape)
        if cache and self._cache_size:
            self._cache[name] = tensor
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tensor

    def close(self) -> None:
        if self._fh:
            self._fh.close()
        self._fh = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        self._cache.clear()
