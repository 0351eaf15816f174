"""moekit eval --expert-stats / --plots: expert load, balance, entropy, oracle recall (issue 3)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.cli.main import main
from moekit.eval.experts import ExpertStats, moe_blocks
from moekit.eval.perplexity import load_model, perplexity, tokenize_texts, windows
from moekit.upcycle import UpcycleConfig, upcycle
from moekit.upcycle.oracle import oracle_scores

TEXT = ["def f(x):\n    return x * 2  # the quick brown fox jumps over the lazy dog\n" * 6]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """(dense folder, {name: MoE folder}) for a 2-layer LLaMA with a tokenizer."""
    from conftest import make_llama, make_tokenizer

    root = tmp_path_factory.mktemp("experts")
    dense = root / "dense"
    make_llama(dense)
    make_tokenizer(dense)
    moes = {
        "mixtral_k2": dict(num_experts=4, top_k=2, method="random", router="random"),
        "qwen_shared_k1": dict(num_experts=4, shared_experts=1, top_k=1, format="qwen2_moe", calib_tokens=256),
        "mixtral_all": dict(num_experts=4, top_k=4, method="random", router="zero"),
    }
    for name, kw in moes.items():
        upcycle(UpcycleConfig(str(dense), str(root / name), **kw), progress=False)
    return dense, {name: root / name for name in moes}


def collect(folder, seq_len=64, batch_size=4, max_tokens=None):  # the last batch is padded
    model, tok, device = load_model(str(folder))
    ids = tokenize_texts(tok, TEXT, max_tokens)
    stats = ExpertStats(model)
    result = perplexity(model, ids, seq_len=seq_len, batch_size=batch_size, progress=False, observer=stats)
    stats.close()
    return model, ids, stats.report(), result


@pytest.mark.parametrize("name", ["mixtral_k2", "qwen_shared_k1"])
def test_load_fractions_match_the_routers_own_choices(upcycled, name):
    _, moes = upcycled
    model, ids, rep, result = collect(moes[name])
    # the same windows, one forward each with router logits, padding dropped
    counts, tokens = {}, 0
    for begin, end, _ in windows(len(ids), 64, 64):
        window = ids[begin:end][None]
        with torch.no_grad():
            out = model(window, output_router_logits=True)
        tokens += window.shape[1]
        for layer, logits in zip(sorted(moe_blocks(model)), out.router_logits):
            k = model.config.num_experts_per_tok
            counts[layer] = counts.get(layer, 0) + torch.bincount(logits.topk(k, -1).indices.flatten(), minlength=logits.shape[-1])
    for layer, v in rep["layers"].items():
        assert v["tokens"] == tokens, "padding is not counted"
        want = counts[int(layer)].float() / counts[int(layer)].sum()
        assert torch.allclose(torch.tensor(v["load"]), want, atol=1e-4)
        assert math.isclose(sum(v["load"]), 1.0, abs_tol=1e-3)
        loads = [x for x in v["load"]]
        if min(loads) > 0:
            assert math.isclose(v["max_min_load_ratio"], max(loads) / min(loads), rel_tol=1e-3)
        assert 0.0 <= v["routing_entropy_norm"] <= 1.0 + 1e-6
        assert 0.0 <= v["oracle_recall"] <= 1.0


def test_uniform_router_has_full_entropy_and_every_expert_active_has_full_recall(upcycled):
    _, moes = upcycled
    _, _, rep, _ = collect(moes["mixtral_all"])
    for v in rep["layers"].values():
        assert math.isclose(v["routing_entropy_norm"], 1.0, abs_tol=1e-6)
        assert v["oracle_recall"] == 1.0
        assert v["load"] == [0.25] * 4 and v["max_min_load_ratio"] == 1.0


def test_oracle_recall_equals_one_computed_from_the_dense_ffn(upcycled):
    """The oracle ranks the dense model's slices the same way, scale or not (fused gate/up order too)."""
    dense, moes = upcycled
    folder = moes["mixtral_k2"]
    model, ids, rep, _ = collect(folder, seq_len=128, batch_size=1, max_tokens=120)
    prov = json.loads((folder / "moekit_upcycle.json").read_text())
    dense_model, _, _ = load_model(str(dense))
    inputs = {}
    block = moe_blocks(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a: inputs.update({0: a[0][0]}))
    with torch.no_grad():
        model(ids[None])
    handle.remove()
    mlp = dense_model.model.layers[0].mlp
    experts = [(mlp.gate_proj.weight[i], mlp.up_proj.weight[i], mlp.down_proj.weight[:, i])
               for i in map(torch.tensor, prov["experts"]["0"])]
    x = inputs[0]
    with torch.no_grad():
        best = oracle_scores(experts, x).topk(2, -1).indices
        chosen = (x @ block.gate.weight.T).softmax(-1).topk(2, -1).indices
    want = (chosen[:, :, None] == best[:, None, :]).any(2).float().mean().item()
    assert math.isclose(rep["layers"]["0"]["oracle_recall"], want, abs_tol=1e-6)


def test_dense_model_has_no_expert_section(upcycled):
    dense, _ = upcycled
    model, _, _ = load_model(str(dense))
    assert not ExpertStats(model)


def test_cli_expert_stats_plots_and_compare(upcycled, tmp_path, capsys):
    dense, moes = upcycled
    data = tmp_path / "d.txt"
    data.write_text(TEXT[0])
    out, plots = tmp_path / "eval.json", tmp_path / "plots"
    assert main(["eval", str(moes["qwen_shared_k1"]), "--compare", str(dense), "--data", str(data), "--seq-len", "64",
                 "--plots", str(plots), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity ratio" in printed and "experts of" in printed and "mean router-vs-oracle recall" in printed
    report = json.loads(out.read_text())
    assert list(report["experts"]) == [str(moes["qwen_shared_k1"])]  # the dense model has no experts
    layers = report["experts"][str(moes["qwen_shared_k1"])]["layers"]
    assert len(layers) == 2 and all(len(v["load"]) == 3 for v in layers.values())
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["expert_load_qwen_shared_k1.png", "perplexity.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    assert report["plots"] == [str(plots / "perplexity.png"), str(plots / "expert_load_qwen_shared_k1.png")]


def test_plain_eval_is_unchanged(upcycled, tmp_path, capsys):
    dense, moes = upcycled
    data = tmp_path / "d.txt"
    data.write_text(TEXT[0])
    out = tmp_path / "eval.json"
    assert main(["eval", str(moes["mixtral_k2"]), "--data", str(data), "--seq-len", "64", "--output", str(out)]) == 0
    assert "experts of" not in capsys.readouterr().out
    assert "experts" not in json.loads(out.read_text()) and "plots" not in json.loads(out.read_text())
