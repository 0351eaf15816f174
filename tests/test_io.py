"""moekit.io: the streaming writer, the loader and the index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moekit.errors import InputError, OutputExistsError
from moekit.io import ShardedWriter, TensorIndex, TensorLoader, atomic_output, parse_size
from moekit.io.writer import TensorSpec


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(8, 16, generator=g),
        "b": torch.randn(32, generator=g).to(torch.bfloat16),
        "c": torch.randint(0, 9, (3, 4), generator=g),
        "empty": torch.zeros(0, 5),
        "d": torch.randn(40, 40, generator=g).half(),
    }


def plan_of(ts):
    return [TensorSpec(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in ts.items()]


@pytest.mark.parametrize("shard", ["1GB", "1KB"])
def test_writer_round_trips_through_safetensors_and_our_loader(tmp_path, shard):
    ts = tensors()
    with atomic_output(tmp_path / "out") as tmp, ShardedWriter(tmp, plan_of(ts), shard) as w:
        for k, v in ts.items():
            w.write(k, v)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert (len(files) == 1) == (shard == "1GB")
    got = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)
    if len(files) > 1:
        wm = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(wm) == set(ts)
    with TensorLoader(TensorIndex.from_folder(tmp_path / "out"), cache=0) as load:
        assert all(torch.equal(load(k), v) for k, v in ts.items())


def test_writer_refuses_out_of_plan_tensors_and_cleans_up(tmp_path):
    ts = tensors()
    with pytest.raises(RuntimeError, match="expected a, got b"):
        with atomic_output(tmp_path / "out") as tmp, ShardedWriter(tmp, plan_of(ts)) as w:
            w.write("b", ts["b"])
    with pytest.raises(RuntimeError, match="planned"):
        with atomic_output(tmp_path / "out") as tmp, ShardedWriter(tmp, plan_of(ts)) as w:
            w.write("a", ts["a"].double())
    with pytest.raises(RuntimeError, match="closed after 1 of 5"):
        with atomic_output(tmp_path / "out") as tmp, ShardedWriter(tmp, plan_of(ts)) as w:
            w.write("a", ts["a"])
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output(tmp_path / "out"):
            pass


def test_index_detects_truncation_and_missing_index_entries(tmp_path):
    ts = tensors()
    with atomic_output(tmp_path / "m") as tmp, ShardedWriter(tmp, plan_of(ts), "1KB") as w:
        for k, v in ts.items():
            w.write(k, v)
    idx = TensorIndex.from_folder(tmp_path / "m")
    assert idx["a"].shape == (8, 16) and idx["b"].dtype == "bfloat16"
    assert idx.total_bytes == sum(v.numel() * v.element_size() for v in ts.values())
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(InputError, match="truncated"):
        TensorIndex.from_folder(tmp_path / "m")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
