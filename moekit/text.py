"""Text sources for evaluation and calibration: files, Hub datasets, or built-in text.

The built-in text is Python's own reference documentation (``pydoc_data``, in
every CPython install), so the quickstart and tests need no download. Topics
are split deterministically: calibration never sees the evaluation part.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import InputError, MissingDependencyError

BUILTIN = "builtin"


def builtin_texts(split: str = "eval") -> list[str]:
    """Python reference topics; ``eval`` = every 4th topic, ``calib`` = the rest."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split not in ("eval", "calib"):
        raise ValueError(split)
    return [topics[n] for i, n in enumerate(names) if (i % 4 == 3) == (split == "eval")]


def load_texts(source: str | None, field: str = "text", split: str = "eval") -> list[str]:
    """Documents from ``source``: a .txt / .jsonl / .json / .parquet file, a Hub dataset
    id (``name``, ``name:config`` or ``name@split``), or ``builtin`` / None.

    Example:
        >>> len(load_texts("builtin")) > 10
        True
    """
    if source in (None, BUILTIN, f"{BUILTIN}:{split}"):
        return builtin_texts(split)
    if source.startswith(f"{BUILTIN}:"):
        return builtin_texts(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if path.is_file():
        texts = _read_file(path, field)
    elif path.suffix in (".txt", ".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~")):
        raise InputError(f"data file {source} does not exist — check the path")
    else:
        texts = _read_hub(source, field)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InputError(f"{source} contains no text — give a file with text (or field {field!r})")
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    if path.suffix == ".txt" or path.suffix == "":
        return [path.read_text(errors="replace")]
    if path.suffix in (".jsonl", ".json"):
        rows = []
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else None
        try:
            rows = [json.loads(l) for l in lines if l.strip()] if lines is not None else json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}) — fix the file") from None
        return [_field(r, field, path) for r in rows]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise InputError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}) — pass --text-field")
        return [str(v) for v in table.column(field).to_pylist()]
    raise InputError(f"unsupported data file {path.name} — use .txt, .jsonl, .json or .parquet")


def _field(row, field: str, path: Path) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise InputError(f"{path}: a row has no {field!r} field (it has: {keys}) — pass --text-field")
    return str(row[field])


def _read_hub(source: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("Hub datasets need the `datasets` package — pip install 'moekit[train]'") from None
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # datasets raises many types; none is actionable beyond this
        raise InputError(f"could not load dataset {source} ({e.__class__.__name__}: {str(e)[:100]}) — check the name, split and network") from None
    if field not in ds.column_names:
        raise InputError(f"dataset {source} has no column {field!r} (columns: {', '.join(ds.column_names)}) — pass --text-field")
    return list(ds[field])
