"""moekit eval: perplexity arithmetic, comparison, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.cli.main import main
from moekit.eval.perplexity import perplexity, windows
from moekit.upcycle import UpcycleConfig, upcycle


@pytest.mark.parametrize("n,seq,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 32, 8), (50, 10, 1)])
def test_windows_score_each_token_at_most_once(n, seq, stride):
    spans = windows(n, seq, stride)
    scored = [t for b, e, f in spans for t in range(f, e)]
    assert len(scored) == len(set(scored))
    assert all(e - b <= seq and f > b for b, e, f in spans)
    if stride < seq:
        assert sorted(scored) == list(range(1, n))  # overlapping windows score everything
    else:  # disjoint windows: only each window's first token (no context) goes unscored
        assert sorted(scored) == [t for t in range(1, n) if t % seq]


def test_single_window_perplexity_equals_the_model_loss(tiny_llama):
    _, model = tiny_llama
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seq_len=64, progress=False)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert r["tokens"] == 39 and math.isclose(r["perplexity"], math.exp(loss), rel_tol=1e-5)


def test_batched_padded_windows_match_one_at_a_time(tiny_llama):
    _, model = tiny_llama
    ids = torch.randint(3, 128, (75,), generator=torch.Generator().manual_seed(0))
    a = perplexity(model, ids, seq_len=16, stride=7, batch_size=1, progress=False)
    b = perplexity(model, ids, seq_len=16, stride=7, batch_size=5, progress=False)
    assert a["tokens"] == b["tokens"] == 74 and math.isclose(a["nll"], b["nll"], rel_tol=1e-5)


def test_cli_compare_exact_moe_with_dense(tiny_llama_with_tokenizer, tmp_path, capsys):
    src, _ = tiny_llama_with_tokenizer
    moe = tmp_path / "moe"
    upcycle(UpcycleConfig(str(src), str(moe), num_experts=4, top_k=4), progress=False)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"content": f"line {i}: the quick brown fox {i * 7}"}) for i in range(30)))
    out = tmp_path / "eval.json"
    assert main(["eval", str(moe), "--compare", str(src), "--data", str(data), "--text-field", "content",
                 "--seq-len", "64", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    dense, moe_r = report["results"][str(src)], report["results"][str(moe)]
    assert dense["tokens"] == moe_r["tokens"] > 500
    assert math.isclose(report["ratio"], 1.0, rel_tol=1e-4)
    assert "ratio" in capsys.readouterr().out


@pytest.mark.parametrize("data,message", [
    ("missing.txt", "does not exist"),
    ("bad.jsonl", "has no 'text' field"),
    ("empty.txt", "contains no text"),
])
def test_cli_bad_data_one_line(tiny_llama_with_tokenizer, tmp_path, capsys, data, message):
    src, _ = tiny_llama_with_tokenizer
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "empty.txt").write_text("  \n")
    capsys.readouterr()
    assert main(["eval", str(src), "--data", str(tmp_path / data)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
