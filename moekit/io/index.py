"""Which tensors a checkpoint holds, where, and with what shape — read from
safetensors headers only, never from the tensor data."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import InputError

# safetensors dtype tags -> torch dtype names (torch imported lazily by users).
ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# What a model folder needs besides weights; fetched from the Hub when SRC is a repo id.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte position of the data in ``file``


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header (and the data section's start); check the file is as long as it claims."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise InputError(f"missing weight shard {path} — re-download the model so every shard listed in its index is present") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a valid safetensors file ({e}) — re-download or re-save it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise InputError(
            f"{path} is truncated ({size} bytes, header promises {8 + n + end}) — re-download it"
        )
    return header, 8 + n


class TensorIndex:
    """Name -> :class:`TensorInfo` for every tensor of a (possibly sharded) checkpoint.

    Example:
        >>> idx = TensorIndex.from_folder("path/to/llama")    # doctest: +SKIP
        >>> idx["model.embed_tokens.weight"].shape             # doctest: +SKIP
        (32000, 4096)
    """

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TensorIndex":
        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            if any(next(folder.glob(p), None) for p in PICKLE_PATTERNS):
                raise InputError(
                    f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded — "
                    "convert them to safetensors first (transformers: model.save_pretrained(dir)), "
                    "or pass --allow-pickle if you trust this checkpoint"
                )
            raise InputError(f"no *.safetensors weights in {folder} — point SRC at a saved transformers model folder")
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            header, data_start = read_safetensors_header(path)
            for name, meta in header.items():
                dtype = ST_DTYPES.get(meta["dtype"], meta["dtype"])
                start, end = meta["data_offsets"]
                tensors[name] = TensorInfo(name, path, dtype, tuple(meta["shape"]), end - start, data_start + start)
        if index_file.exists():
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise InputError(f"{index_file.name} lists {missing[0]} but no shard holds it — re-download the model")
        return cls(folder, tensors)

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"tensor {name} is missing from {self.folder} — is this a complete LLaMA checkpoint?") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def resolve_model_dir(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched through the HF cache
    (weights as safetensors only; honours HF_HUB_OFFLINE)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{src} is a file — pass the model folder that holds config.json and the weights")
    if str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise InputError(f"model folder {src} does not exist — check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except RepositoryNotFoundError:
        raise InputError(f"{src} is neither a local folder nor a Hub model repo you can access — check the name or run `hf auth login`") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{src} is not a local folder and is not in the Hugging Face cache, and the Hub is unreachable (offline?) — download it first or pass a local path") from None
    except HfHubHTTPError as e:
        raise InputError(f"could not fetch {src} from the Hub ({e.__class__.__name__}) — check the network or pass a local path") from None
