"""moekit upcycle: exactness, streaming I/O, round trips and bad input (issue 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import make_llama, make_tokenizer
from moekit.cli.main import main
from moekit.upcycle import UpcycleConfig, upcycle

# strategy x format x top-k: every case must reproduce the dense logits.
EXACT_CASES = [
    ("random", "mixtral", 4),
    ("random", "qwen2_moe", 4),
    ("copy", "mixtral", 2),
    ("copy", "qwen2_moe", 1),
    ("copy", "mixtral", 4),
]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()


def no_leftovers(parent: Path, name: str) -> bool:
    """Nothing named like the output (final or temporary) is left in ``parent``."""
    return not [p for p in parent.iterdir() if name in p.name]


@pytest.mark.parametrize("method,fmt,k", EXACT_CASES)
def test_all_experts_active_reproduces_dense(tiny_llama, tmp_path, tokens, method, fmt, k):
    src, dense = tiny_llama
    out = tmp_path / "moe"
    upcycle(UpcycleConfig(str(src), str(out), num_experts=4, top_k=k, method=method, format=fmt), progress=False)
    moe = load(out)
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    assert (logits(moe, tokens) - logits(dense, tokens)).abs().max() <= 1e-4


def test_split_with_fewer_active_experts_differs_and_routes_per_token(tiny_llama, tmp_path, tokens):
    src, dense = tiny_llama
    out = tmp_path / "moe"
    upcycle(UpcycleConfig(str(src), str(out), num_experts=4, top_k=2), progress=False)
    moe = load(out)
    assert (logits(moe, tokens) - logits(dense, tokens)).abs().max() > 1e-3
    # the zero router got symmetry-breaking noise: tokens do not all pick the same experts
    out_ = moe(tokens, output_router_logits=True)
    picks = out_.router_logits[0].topk(2, dim=-1).indices.sort(dim=-1).values
    assert len({tuple(p.tolist()) for p in picks}) > 1


def test_experts_partition_the_neurons_and_seed_is_deterministic(tiny_llama, tmp_path):
    src, _ = tiny_llama
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        upcycle(UpcycleConfig(str(src), str(tmp_path / name), num_experts=4, seed=seed), progress=False)
        runs[name] = json.loads((tmp_path / name / "moekit_upcycle.json").read_text())["experts"]
    for layer, experts in runs["a"].items():
        flat = sorted(i for e in experts for i in e)
        assert flat == list(range(96)), "every neuron in exactly one expert"
        assert {len(e) for e in experts} == {24}
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_expert_weights_are_the_dense_slices(tiny_llama, tmp_path):
    src, dense = tiny_llama
    out = tmp_path / "moe"
    upcycle(UpcycleConfig(str(src), str(out), num_experts=4, top_k=2), progress=False)
    experts = json.loads((out / "moekit_upcycle.json").read_text())["experts"]
    sd = dense.state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        idx = torch.tensor(experts["1"][2])
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
        assert torch.equal(w1, sd["model.layers.1.mlp.gate_proj.weight"][idx])
        assert torch.allclose(w2, sd["model.layers.1.mlp.down_proj.weight"][:, idx] * 4)  # scale auto = N


def test_sharded_input_sharded_output_round_trip_and_generate(tmp_path, tokens):
    src = tmp_path / "dense"
    dense = make_llama(src, layers=3, shard="40KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", "4", "--max-shard-size", "60KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    moe = load(out)
    assert (logits(moe, tokens) - logits(dense, tokens)).abs().max() <= 1e-4
    moe.save_pretrained(tmp_path / "resaved")
    again = load(tmp_path / "resaved")
    assert torch.equal(logits(again, tokens), logits(moe, tokens))
    gen = moe.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_tied_embeddings_bf16_and_dtype_conversion(tmp_path, tokens):
    src = tmp_path / "dense"
    dense = make_llama(src, tie=True, dtype=torch.bfloat16)
    upcycle(UpcycleConfig(str(src), str(tmp_path / "bf16"), num_experts=2, top_k=2), progress=False)
    upcycle(UpcycleConfig(str(src), str(tmp_path / "fp32"), num_experts=2, top_k=2, dtype="float32"), progress=False)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    fp32 = load(tmp_path / "fp32")
    assert fp32.config.tie_word_embeddings
    ref = logits(dense.float(), tokens)
    assert (logits(fp32, tokens) - ref).abs().max() <= 1e-4


def test_mistral_source_and_tokenizer_files_are_carried(tmp_path, tokens):
    src = tmp_path / "dense"
    dense = make_llama(src, model_type="mistral")
    make_tokenizer(src)
    out = tmp_path / "moe"
    upcycle(UpcycleConfig(str(src), str(out), num_experts=4, top_k=4, format="qwen2_moe"), progress=False)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert (logits(load(out), tokens) - logits(dense, tokens)).abs().max() <= 1e-4
    qcfg = json.loads((out / "config.json").read_text())
    assert qcfg["use_sliding_window"] is False and qcfg["shared_expert_intermediate_size"] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # vLLM expects explicit q/k/v biases
        assert torch.count_nonzero(f.get_tensor("model.layers.0.self_attn.q_proj.bias")) == 0


def test_dry_run_prints_plan_and_writes_nothing(tiny_llama, tmp_path, capsys):
    src, _ = tiny_llama
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in text
    # total: embed+lm_head 2*128*64, per layer attn 64*64*2 + 32*64*2, norms 2*64, router 4*64, FFN 3*64*96
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 64 + 4 * 64 + 3 * 64 * 96
    total = 2 * 128 * 64 + 64 + 2 * per_layer
    active = total - 2 * 3 * (3 * 64 * 24)
    assert f"total {total / 1e6:,.1f}M" in text and f"active per token {active / 1e6:,.1f}M" in text
    assert not out.exists()


def test_recipe_sets_values_and_cli_flags_win(tiny_llama, tmp_path):
    src, _ = tiny_llama
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"upcycle:\n  source: {src}\n  output: {tmp_path / 'moe'}\n  num_experts: 2\n  top_k: 2\n  seed: 7\n")
    assert main(["upcycle", "--config", str(recipe), "--num-experts", "4", "--top-k", "4"]) == 0
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 4
    saved = (tmp_path / "moe" / "moekit_recipe.yaml").read_text()
    assert "seed: 7" in saved and "num_experts: 4" in saved
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "moekit upcycle" in card and "- moe" in card and "- upcycling" in card


def test_force_replaces_existing_output(tiny_llama, tmp_path):
    src, _ = tiny_llama
    out = tmp_path / "moe"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["upcycle", str(src), str(out), "--num-experts", "2", "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if "moekit-" in p.name] == []


def test_failure_mid_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from moekit.upcycle import strategies

    src, _ = tiny_llama
    spec = strategies.STRATEGIES.get("random")
    calls = []

    def exploding(ffn, n, seed, stats=None):
        calls.append(1)
        if len(calls) == 2:  # second layer: the first layer's shard bytes are already on disk
            raise RuntimeError("disk full")
        return spec.fn(ffn, n, seed, stats)

    monkeypatch.setitem(strategies.STRATEGIES._items, "random", spec.__class__(**{**spec.__dict__, "fn": exploding}))
    with pytest.raises(RuntimeError, match="disk full"):
        upcycle(UpcycleConfig(str(src), str(tmp_path / "moe"), num_experts=4), progress=False)
    assert no_leftovers(tmp_path, "moe")


def test_pickle_weights_need_opt_in(tmp_path, tokens):
    src = tmp_path / "dense"
    dense = make_llama(src)
    torch.save(dense.state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", "4", "--allow-pickle"]) == 0
    assert (logits(load(out), tokens) - logits(dense, tokens)).abs().max() <= 1e-4


# --- bad input: one line on stderr, exit 1, nothing left behind ------------------------------


def _gpt2(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(folder)


def _truncate(folder):
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _delete_shard(folder):
    sorted(folder.glob("*.safetensors"))[0].unlink()


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


BAD_INPUTS = [
    ("not llama", _gpt2, [], "not LlamaForCausalLM"),
    ("not divisible", None, ["--num-experts", "5"], "not divisible by num_experts=5"),
    ("k > n", None, ["--num-experts", "4", "--top-k", "5"], "top_k=5 must be between 1 and num_experts=4"),
    ("missing shard", _delete_shard, [], "missing weight shard"),
    ("truncated shard", _truncate, [], "is truncated"),
    ("pickle only", _pickle_only, [], "--allow-pickle"),
    ("bad scale", None, ["--scale", "big"], "scale='big'"),
    ("missing source", "missing", [], "does not exist"),
]


@pytest.mark.parametrize("case,prepare,flags,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_error(tmp_path, capsys, case, prepare, flags, message):
    src = tmp_path / "dense"
    if prepare == "missing":
        src = tmp_path / "nowhere" / "dense"
    elif prepare is _gpt2:
        _gpt2(src)
    else:
        make_llama(src, shard="40KB" if prepare in (_truncate, _delete_shard) else None)
        if prepare:
            prepare(src)
    out = tmp_path / "moe"
    capsys.readouterr()
    code = main(["upcycle", str(src), str(out), *flags])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("moekit upcycle: error:") and " — " in err  # problem — fix
    assert no_leftovers(tmp_path, "moe")


def test_existing_output_without_force_is_untouched(tiny_llama, tmp_path, capsys):
    src, _ = tiny_llama
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["upcycle", str(src), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_recipe_key_is_an_error(tiny_llama, tmp_path, capsys):
    src, _ = tiny_llama
    recipe = tmp_path / "r.yaml"
    recipe.write_text("upcycle:\n  num_expert: 4\n")
    assert main(["upcycle", str(src), str(tmp_path / "moe"), "--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "unknown key upcycle.num_expert" in err and "num_experts" in err


def test_debug_env_shows_traceback(tiny_llama, tmp_path, monkeypatch):
    from moekit.errors import ConfigError

    src, _ = tiny_llama
    monkeypatch.setenv("MOEKIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["upcycle", str(src), str(tmp_path / "moe"), "--num-experts", "5"])


@pytest.mark.parametrize("scale", [8.0, 4.0, 0.25, 3.0, 0.37])
@pytest.mark.parametrize("special", [True, False])  # False: the exponent-add path of powers of two
def test_fast_bf16_scaling_is_bit_identical_to_torch(scale, special):
    from moekit.upcycle.convert import _scale_bf16

    x = (torch.randn(64, 33, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    x[1, :2] = torch.tensor([1e30, -1e-30]).bfloat16()  # normal, far from the range ends
    if special:
        x[0, :6] = torch.tensor([0.0, -0.0, float("inf"), 1e-40, 3e38, float("nan")]).bfloat16()
    got, want = _scale_bf16(x, scale), x.clone().mul_(scale)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("scale", [8.0, 0.25])
@pytest.mark.parametrize("edge", [0, 1])  # 0: last exponent the exponent-add path takes, 1: one past it
def test_bf16_scaling_at_the_ends_of_the_exponent_range(scale, edge):
    import math

    from moekit.upcycle.convert import _scale_bf16

    shift = math.frexp(scale)[1] - 1
    field = 254 - shift + edge if shift > 0 else 1 - shift - edge  # biased exponent at the boundary
    x = (torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 0.05).bfloat16()
    x[0, 0], x[0, 1] = 2.0 ** (field - 127), -1.5 * 2.0 ** (field - 127)
    got, want = _scale_bf16(x, scale), x.clone().mul_(scale)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_push_to_hub_uploads_the_finished_output(tiny_llama, tmp_path, monkeypatch, capsys):
    from test_push import RecordingApi

    import moekit.hub.push as push

    api = RecordingApi()
    monkeypatch.setattr(push, "hub_client", lambda: api)
    src, _ = tiny_llama
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), str(out), "--num-experts", "2", "--push-to-hub", "me/tiny-moe", "--private"]) == 0
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True and api.calls[1][1]["folder_path"] == str(out)
    assert {"model.safetensors", "config.json", "README.md", "moekit_upcycle.json"} <= set(api.uploaded)
    assert "pushed: https://huggingface.co/me/tiny-moe" in capsys.readouterr().out


def test_push_to_hub_offline_is_one_line(tiny_llama, tmp_path, capsys):
    src, _ = tiny_llama
    capsys.readouterr()
    assert main(["upcycle", str(src), str(tmp_path / "moe"), "--num-experts", "2", "--push-to-hub", "me/x"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists()  # checked before converting anything
