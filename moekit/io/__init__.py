"""All lazy tensor I/O lives here: an index of a checkpoint's tensors, a loader
that keeps one shard open, and a sharding writer that streams tensors to disk
inside a temporary folder renamed into place on success."""

from moekit.io.index import TensorIndex, TensorInfo, resolve_model_dir
from moekit.io.loader import TensorLoader
from moekit.io.writer import ShardedWriter, parse_size, atomic_output

__all__ = [
    "TensorIndex",
    "TensorInfo",
    "TensorLoader",
    "ShardedWriter",
    "atomic_output",
    "parse_size",
    "resolve_model_dir",
]
