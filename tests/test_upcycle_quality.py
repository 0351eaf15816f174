"""Data-driven upcycling (issue 3): methods, shared experts, dense layers, routers, calibration."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import make_llama, make_tokenizer
from moekit.cli.main import main
from moekit.upcycle import UpcycleConfig, upcycle
from moekit.upcycle.calibration import LayerStats
from moekit.upcycle.split import SplitSpec, split_layer
from moekit.upcycle.strategies import FFN, STRATEGIES

CALIB = 256  # calibration tokens: enough for every statistic, fast on a tiny model
METHODS = ["random", "clustering", "coactivation", "importance", "gradient"]
ROUTERS = ["calibrated", "centroid"]
I = 96  # the tiny model's intermediate size


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()


def provenance(folder) -> dict:
    return json.loads((Path(folder) / "moekit_upcycle.json").read_text())


def run(src, out, **kw):
    kw.setdefault("calib_tokens", CALIB)
    return upcycle(UpcycleConfig(str(src), str(out), **kw), progress=False)


@pytest.fixture(scope="module")
def dense3(tmp_path_factory):
    """(folder, model): a 3-layer random LLaMA with a character tokenizer, shared by the module."""
    folder = tmp_path_factory.mktemp("dense3") / "dense"
    model = make_llama(folder, layers=3)
    make_tokenizer(folder)
    return folder, model


# --- exactness: every method x format x shared/dense, every routed expert active ----------------

EXACT = [(m, "mixtral", 0, []) for m in METHODS] + [(m, "qwen2_moe", 0, []) for m in METHODS] \
    + [(m, "qwen2_moe", 1, [-1]) for m in METHODS]


@pytest.mark.parametrize("method,fmt,shared,dense_layers", EXACT)
def test_every_routed_expert_active_reproduces_dense(dense3, tmp_path, tokens, method, fmt, shared, dense_layers):
    src, dense = dense3
    out = tmp_path / "moe"
    n = 4
    # a calibrated router is zero when every routed expert is active, so the output is exact
    run(src, out, num_experts=n, shared_experts=shared, top_k=n - shared, method=method, format=fmt,
        dense_layers=dense_layers, router="calibrated")
    moe = load(out)
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    assert (logits(moe, tokens) - logits(dense, tokens)).abs().max() <= 1e-4
    prov = provenance(out)
    assert prov["method"] == method and prov["router"] == "calibrated"
    assert set(prov["scales"].values()) == {float(n - shared)}
    if dense_layers:
        assert moe.config.mlp_only_layers == [2] and "2" not in prov["experts"]


@pytest.mark.parametrize("router", ROUTERS)
def test_data_routers_are_uniform_when_every_expert_is_active(dense3, tmp_path, tokens, router):
    src, dense = dense3
    run(src, tmp_path / "moe", num_experts=4, shared_experts=1, top_k=3, format="qwen2_moe", router=router)
    assert (logits(load(tmp_path / "moe"), tokens) - logits(dense, tokens)).abs().max() <= 1e-4


# --- structure: balanced experts, the shared expert, determinism ------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_balanced_partition_with_shared_expert_of_the_most_important_neurons(dense3, tmp_path, method):
    src, _ = dense3
    out = tmp_path / "moe"
    run(src, out, num_experts=4, shared_experts=1, top_k=1, method=method, format="qwen2_moe")
    prov = provenance(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]) == (3, 24, 24)
    assert cfg["norm_topk_prob"] is False  # softmax weights: a top-1 router still learns
    for layer, experts in prov["experts"].items():
        shared = prov["shared_expert"][layer]
        assert [len(e) for e in experts] == [24, 24, 24] and len(shared) == 24
        assert sorted(shared + [i for e in experts for i in e]) == list(range(I)), "each neuron exactly once"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.2.gate_proj.weight").shape == (24, 64)
        assert f.get_tensor("model.layers.0.mlp.shared_expert.down_proj.weight").shape == (64, 24)
        assert torch.equal(f.get_tensor("model.layers.0.mlp.shared_expert_gate.weight"), torch.zeros(1, 64))


def _planted_ffn_and_stats(seed=0, H=16, E=4, n=8, T=1024):
    """An FFN whose neurons come in E blocks, each firing on its own cluster of inputs."""
    g = torch.Generator().manual_seed(seed)
    centers_EH = torch.nn.functional.normalize(torch.randn(E, H, generator=g), dim=1) * 4
    gate_IH = (centers_EH.repeat_interleave(n, 0) + 0.3 * torch.randn(E * n, H, generator=g))
    up_IH = torch.randn(E * n, H, generator=g) * 0.3 + gate_IH * 0.5
    down_HI = torch.randn(H, E * n, generator=g)
    label_T = torch.randint(E, (T,), generator=g)
    x_TH = centers_EH[label_T] / 4 + 0.2 * torch.randn(T, H, generator=g)
    ffn = FFN(gate_IH, up_IH, down_HI)
    a_TI = ffn.activations(x_TH)
    stats = LayerStats((a_TI.abs().mean(0) * down_HI.norm(dim=0)), x_TH, a_TI.abs().mean(0), T)
    blocks = {tuple(range(e * n, (e + 1) * n)) for e in range(E)}
    return ffn, stats, blocks


@pytest.mark.parametrize("method", METHODS)
def test_split_is_deterministic_under_seed_and_balanced(method):
    ffn, stats, _ = _planted_ffn_and_stats()
    spec = SplitSpec(method, "calibrated", num_slices=4, top_k=1, renormalize=False)
    a, b = split_layer(ffn, stats, spec, seed=3), split_layer(ffn, stats, spec, seed=3)
    assert torch.equal(a.assign_EN, b.assign_EN) and torch.equal(a.router_EH, b.router_EH) and a.scale == b.scale
    assert a.assign_EN.shape == (4, 8) and sorted(a.assign_EN.flatten().tolist()) == list(range(32))
    if method == "random":
        assert not torch.equal(split_layer(ffn, stats, spec, seed=4).assign_EN, a.assign_EN)


@pytest.mark.parametrize("method", ["coactivation", "gradient"])
def test_shared_expert_holds_the_most_important_neurons(method):
    ffn, stats, _ = _planted_ffn_and_stats()
    stats.grad_importance_I = torch.rand(32, generator=torch.Generator().manual_seed(5))  # differs from importance_I
    spec = SplitSpec(method, "calibrated", num_slices=4, num_shared=1, top_k=1, renormalize=False)
    s = split_layer(ffn, stats, spec, seed=0)
    importance = stats.grad_importance_I if method == "gradient" else stats.importance_I
    assert s.shared_N.tolist() == sorted(importance.topk(8).indices.tolist())
    assert s.assign_EN.shape == (3, 8) and sorted(s.shared_N.tolist() + s.assign_EN.flatten().tolist()) == list(range(32))


def test_seed_changes_the_whole_run_and_repeats_it_exactly(dense3, tmp_path):
    src, _ = dense3
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run(src, tmp_path / name, num_experts=4, top_k=2, method="clustering", seed=seed)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
    assert provenance(tmp_path / "a")["experts"] == provenance(tmp_path / "b")["experts"]
    assert provenance(tmp_path / "a")["experts"] != provenance(tmp_path / "c")["experts"]


# --- routers: planted structure ---------------------------------------------------------------


def test_coactivation_recovers_planted_experts_and_calibrated_router_finds_them():
    ffn, stats, blocks = _planted_ffn_and_stats()
    recall = {}
    for router in ("random", "zero", "centroid", "calibrated"):
        s = split_layer(ffn, stats, SplitSpec("coactivation", router, num_slices=4, top_k=1, renormalize=False), seed=0)
        assert {tuple(e.tolist()) for e in s.assign_EN} == blocks, "neurons that fire together form an expert"
        recall[router] = s.recall
    assert recall["calibrated"] >= 0.9 and recall["calibrated"] >= recall["random"] + 0.4
    assert recall["centroid"] >= recall["random"] + 0.3


def test_calibrated_router_beats_random_end_to_end_and_recall_is_reported(dense3, tmp_path, capsys):
    src, _ = dense3
    for router in ("random", "calibrated"):
        assert main(["upcycle", str(src), str(tmp_path / router), "--format", "qwen2_moe", "--num-experts", "4",
                     "--shared-experts", "1", "--top-k", "1", "--router", router, "--calib-tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert "router top-k recall vs oracle" in printed and "calibrated on 512 tokens of builtin" in printed
    mean = {r: sum(v) / len(v) for r in ("random", "calibrated")
            for v in [list(provenance(tmp_path / r)["router_recall"].values())]}
    assert mean["calibrated"] > mean["random"] + 0.15
    card = (tmp_path / "calibrated" / "README.md").read_text()
    assert "router top-k recall vs oracle" in card and "shared expert of 24 neurons" in card


def test_fitted_scale_beats_fixed_scales_on_the_calibration_objective():
    from moekit.upcycle.split import moe_forward

    ffn, stats, _ = _planted_ffn_and_stats(seed=1)
    spec = SplitSpec("coactivation", "calibrated", num_slices=4, top_k=1, renormalize=False)
    s = split_layer(ffn, stats, spec, seed=0)
    want = ffn.activations(stats.x_TH) @ ffn.down_HI.T

    def err(scale):
        s.scale = scale
        return float((moe_forward(ffn, s, spec, stats.x_TH) - want).pow(2).sum())

    fitted = s.scale
    assert err(fitted) < min(err(fitted * 0.7), err(fitted * 1.4), err(4.0), err(16.0))


# --- calibration walks the upcycled model, layer by layer ---------------------------------------


def test_calibration_sees_the_hidden_states_the_moe_model_produces(dense3, tmp_path, monkeypatch):
    import moekit.upcycle.calibration as calibration

    src, _ = dense3
    seen = {}
    original = calibration.Calibrator.layer

    def spy(self, layer, load):
        stats = original(self, layer, load)
        seen[layer], seen["ids"], seen["idx"] = stats.x_TH.clone(), self.ids_BT, self.sample_idx
        return stats

    monkeypatch.setattr(calibration.Calibrator, "layer", spy)
    out = tmp_path / "moe"
    run(src, out, num_experts=4, shared_experts=1, top_k=1, format="qwen2_moe", dense_layers=[1])
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = {}
    for l, layer in enumerate(moe.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, l=l: inputs.setdefault(l, []).append(a[0]))
    with torch.no_grad():
        moe(seen["ids"])
    assert sorted(k for k in seen if isinstance(k, int)) == [0, 2]  # dense layer 1 is walked, not split
    for layer in (0, 2):
        want = torch.cat(inputs[layer]).flatten(0, 1)[seen["idx"]]
        assert (seen[layer] - want).abs().max() <= 1e-4 * want.abs().max()


def test_gradient_importance_matches_autograd(dense3):
    from moekit.io import TensorIndex, TensorLoader
    from moekit.upcycle.calibration import Calibrator, calibration_ids
    from moekit.upcycle.convert import load_source_config

    src, dense = dense3
    ids = calibration_ids(src, "builtin", "text", CALIB, 128)
    acts = {}

    def keep(module, args, l):
        args[0].retain_grad()
        acts[l] = args[0]

    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: keep(m, a, l))
               for l, layer in enumerate(dense.model.layers)]
    try:
        dense(ids, labels=ids).loss.backward()
    finally:
        for h in handles:
            h.remove()
        dense.zero_grad(set_to_none=True)
    cal = Calibrator(load_source_config(src), ids, gradients=True)
    with TensorLoader(TensorIndex.from_folder(src)) as load_:
        for layer in range(3):
            got = cal.layer(layer, load_).grad_importance_I
            want = (acts[layer] * acts[layer].grad).abs().flatten(0, 1).mean(0)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# --- defaults, recipes, bad input ---------------------------------------------------------------


def test_auto_is_data_driven_with_a_tokenizer_and_data_free_without(dense3, tiny_llama, tmp_path):
    run(dense3[0], tmp_path / "a", num_experts=4, top_k=2)
    run(tiny_llama[0], tmp_path / "b", num_experts=4, top_k=2)
    a, b = provenance(tmp_path / "a"), provenance(tmp_path / "b")
    assert (a["method"], a["router"], a["calibration"]["tokens"]) == ("coactivation", "calibrated", CALIB)
    assert (b["method"], b["router"], b["calibration"], b["scale"]) == ("random", "zero", None, 4.0)


def test_resolved_recipe_and_card_command_reproduce_the_run(dense3, tmp_path):
    from moekit.cli.main import build_parser
    from moekit.config import build_config

    src, _ = dense3
    out = tmp_path / "moe"
    config = UpcycleConfig(str(src), str(out), num_experts=4, shared_experts=1, top_k=1, format="qwen2_moe",
                           dense_layers=[0, -1], norm_topk_prob=True, method="importance", calib_tokens=CALIB)
    upcycle(config, progress=False)
    config = dataclasses.replace(config, router="calibrated")  # "auto" is pinned to what ran
    assert build_config(UpcycleConfig, out / "moekit_recipe.yaml", "upcycle") == config
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [0, 2]
    card = (out / "README.md").read_text()
    command = next(l for l in card.splitlines() if l.startswith("moekit upcycle "))
    args = build_parser().parse_args(shlex.split(command)[1:])
    keys = [f for f in vars(config) if hasattr(args, f)]
    assert build_config(UpcycleConfig, None, "upcycle", **{k: getattr(args, k) for k in keys}) == config


def test_calibration_reads_a_jsonl_file(dense3, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"sample {i}: the quick brown fox {i * 3}"}) for i in range(40)))
    run(dense3[0], tmp_path / "moe", num_experts=4, top_k=1, calib_data=str(data), calib_text_field="body")
    assert provenance(tmp_path / "moe")["calibration"]["data"] == str(data)


BAD = [
    ("shared >= N", ["--num-experts", "4", "--shared-experts", "4"], "shared_experts=4 must be between 0 and"),
    ("K > N - S", ["--format", "qwen2_moe", "--num-experts", "4", "--shared-experts", "1", "--top-k", "4"],
     "top_k=4 must be at most num_experts - shared_experts = 3"),
    ("missing calib file", ["--calib-data", "{tmp}/nope.jsonl"], "does not exist"),
    ("shared on mixtral", ["--num-experts", "4", "--shared-experts", "1", "--top-k", "1"], "use --format qwen2_moe"),
    ("dense layer out of range", ["--format", "qwen2_moe", "--dense-layers", "0,7"], "dense_layers has 7"),
    ("every layer dense", ["--format", "qwen2_moe", "--dense-layers", "0,1,-1"], "keeps every layer dense"),
    ("copy with shared", ["--method", "copy", "--shared-experts", "1"], "no slice to share"),
    ("mixtral renormalises", ["--norm-topk-prob", "false"], "always renormalises"),
    ("no tokenizer", ["--method", "coactivation", "NO_TOKENIZER"], "has no tokenizer"),
]


@pytest.mark.parametrize("case,flags,message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_error_and_no_output(dense3, tiny_llama, tmp_path, capsys, case, flags, message):
    src = tiny_llama[0] if "NO_TOKENIZER" in flags else dense3[0]
    flags = [f.format(tmp=tmp_path) for f in flags if f != "NO_TOKENIZER"]
    out = tmp_path / "moe"
    capsys.readouterr()
    assert main(["upcycle", str(src), str(out), "--calib-tokens", str(CALIB), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("moekit upcycle: error:") and " — " in err
    assert not [p for p in tmp_path.iterdir() if "moe" in p.name], "no output or temporary folder left"


def test_every_method_and_router_is_registered_with_a_spec():
    from moekit.upcycle.routers import ROUTERS as ROUTER_REGISTRY

    for name in METHODS:
        spec = STRATEGIES.get(name)
        assert spec.paper.startswith("https://") and spec.summary
    assert STRATEGIES.get("gradient").needs == ("gradients",)
    for name in ROUTERS:
        assert ROUTER_REGISTRY.get(name).needs == ("activations",)
    with pytest.raises(ValueError, match="already registered"):
        STRATEGIES.register("random", STRATEGIES.get("random"))
