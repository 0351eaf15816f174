"""moekit merge: LM-Cocktail numerics, example weights, LoRA, streaming memory, bad input (issue 6)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_llama, make_tokenizer
from moekit.cli.main import main
from moekit.merge import MergeConfig, merge, plan_merge

WEIGHTS = [0.5, 0.3, 0.2]


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def weighted_sum(folders, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ per tensor in float32, computed independently of moekit."""
    states = [tensors(f) for f in folders]
    return {k: sum(w * s[k].float() for w, s in zip(weights, states)) for k in states[0]}


def assert_close_states(got: dict, want: dict, atol=1e-6):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k].float() - want[k].float()).abs().max() <= atol, k


def no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if name in p.name]


@pytest.fixture(scope="module")
def dense3(tmp_path_factory):
    """Three tiny random LLaMAs with one shared character tokenizer (no pad token)."""
    root = tmp_path_factory.mktemp("dense")
    folders = []
    for seed in (1, 2, 3):
        folder = root / f"m{seed}"
        make_llama(folder, seed=seed)
        make_tokenizer(folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def moe3(dense3, tmp_path_factory):
    """Three tiny Mixtral checkpoints upcycled alike (same split), so tensor names match."""
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("moe")
    out = []
    for d in dense3:
        upcycle(UpcycleConfig(str(d), str(root / d.name), num_experts=4, top_k=2), progress=False)
        out.append(root / d.name)
    return out


@pytest.fixture(params=["dense", "moe"])
def models3(request, dense3, moe3):
    return dense3 if request.param == "dense" else moe3


# --- numerics -------------------------------------------------------------------------------


def test_merge_equals_weighted_sum(models3, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", str(out), *sum((["--model", str(m)] for m in models3), []), "--weights", *map(str, WEIGHTS),
            "--max-shard-size", "100KB"]
    assert main(args) == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert_close_states(tensors(out), weighted_sum(models3, WEIGHTS))
    printed = capsys.readouterr().out
    assert all(f"{w:8.4f}" in printed for w in WEIGHTS)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)  # config, shards and tokenizer make a loadable model
    assert type(model).__name__ == json.loads((models3[0] / "config.json").read_text())["architectures"][0]
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(models3[0]).get_vocab()


def test_weight_one_returns_that_model(models3, tmp_path):
    merge(MergeConfig(str(tmp_path / "one"), models=[str(models3[1])], weights=[1.0]), progress=False)
    merge(MergeConfig(str(tmp_path / "two"), models=[str(m) for m in models3[:2]], weights=[0.0, 1.0]), progress=False)
    want = tensors(models3[1])
    for name in ("one", "two"):
        got = tensors(tmp_path / name)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_dtype_and_target_alpha(dense3, tmp_path):
    """M = α·M_target + (1−α)·Σ wᵢ·Mᵢ, cast once from float32 to --dtype."""
    a, b, c = dense3
    out = tmp_path / "alpha"
    assert main(["merge", str(out), "--base", str(a), "--alpha", "0.6", "--model", str(b), "--model", str(c),
                 "--weights", "0.25", "0.75", "--dtype", "bfloat16"]) == 0
    want = weighted_sum([a, b, c], [0.6, 0.4 * 0.25, 0.4 * 0.75])
    got = tensors(out)
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    # one rounding from the float32 sum: within half a bfloat16 ulp (2^-9 relative), plus float32 noise
    assert all(torch.allclose(got[k].float(), want[k], rtol=2**-8, atol=1e-6) for k in want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_normalize_and_negative_weights(dense3, tmp_path):
    a, b, _ = dense3
    merge(MergeConfig(str(tmp_path / "n"), models=[str(a), str(b)], weights=[2.0, 6.0], normalize=True), progress=False)
    assert_close_states(tensors(tmp_path / "n"), weighted_sum([a, b], [0.25, 0.75]))
    merge(MergeConfig(str(tmp_path / "x"), models=[str(a), str(b)], weights=[1.5, -0.5], allow_negative=True),
          progress=False)
    assert_close_states(tensors(tmp_path / "x"), weighted_sum([a, b], [1.5, -0.5]), atol=1e-5)


# --- weights from examples ------------------------------------------------------------------

EXAMPLES = [
    {"input": "Translate to French: cat", "output": "chat"},
    {"input": "2+2=", "output": "4, obviously, and then some more words"},
    {"input": "Q", "output": "A"},
    {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]},
]


def reference_loss(folder, tokenizer, rows) -> float:
    """Mean cross-entropy over output tokens, one unpadded example at a time, with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    for row in rows:
        if "messages" in row:
            prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        else:
            p = tokenizer(row["input"])["input_ids"]
            ids = tokenizer(row["input"] + " " + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(len(p), len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    return total / count


def test_example_weights_are_softmax_of_output_losses(dense3, tmp_path, capsys):
    from transformers import AutoTokenizer

    data = tmp_path / "ex.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in EXAMPLES) + "\n")
    tok = AutoTokenizer.from_pretrained(dense3[0])
    assert tok.pad_token_id is None  # padding must still work
    out = tmp_path / "cocktail"
    args = ["merge", str(out), *sum((["--model", str(m)] for m in dense3), []), "--examples", str(data),
            "--batch-size", "3"]
    assert main(args) == 0
    losses = [reference_loss(m, tok, EXAMPLES) for m in dense3]
    exp = [math.exp(-l / 5.0) for l in losses]
    weights = [e / sum(exp) for e in exp]
    record = json.loads((out / "moekit_merge.json").read_text())
    assert record["losses"] == pytest.approx(losses, rel=1e-5)
    assert record["weights"] == pytest.approx(weights, rel=1e-6, abs=1e-9)
    printed = capsys.readouterr().out
    assert all(f"{l:.4f}" in printed and f"{w:8.4f}" in printed for l, w in zip(losses, weights))
    assert_close_states(tensors(out), weighted_sum(dense3, weights))
    # batch size must not change the losses (token-weighted mean, padding masked)
    plan = plan_merge(MergeConfig(str(tmp_path / "x"), models=[str(m) for m in dense3], examples=str(data),
                                  batch_size=1, dry_run=True), progress=False)
    assert plan.losses == pytest.approx(losses, rel=1e-5)


# --- LoRA adapters --------------------------------------------------------------------------


def test_lora_adapter_merges_like_peft(moe3, tmp_path):
    """BASE+ADAPTER streamed equals peft's merge_and_unload: attention, embedding, fused experts, router copy."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = moe3[0]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "embed_tokens"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], modules_to_save=["gate"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    reference.merge_and_unload().save_pretrained(tmp_path / "peft-merged")

    spec = f"{base}+{tmp_path / 'adapter'}"
    merge(MergeConfig(str(tmp_path / "lora"), models=[spec], weights=[1.0]), progress=False)
    want, got = tensors(tmp_path / "peft-merged"), tensors(tmp_path / "lora")
    assert_close_states(got, want, atol=1e-6)
    before = tensors(base)
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    assert any("experts.3.w2" in k for k in changed) and any("gate" in k for k in changed)
    assert "model.embed_tokens.weight" in changed and any("q_proj" in k for k in changed)
    # and mixed with another model: 0.5·(base + delta) + 0.5·other
    merge(MergeConfig(str(tmp_path / "mix"), models=[spec, str(moe3[1])], weights=[0.5, 0.5]), progress=False)
    other = tensors(moe3[1])
    assert_close_states(tensors(tmp_path / "mix"), {k: 0.5 * want[k] + 0.5 * other[k] for k in want})
    assert "lora" in (tmp_path / "mix" / "README.md").read_text().split("---")[1]
    # losses of BASE+ADAPTER come from the adapted model
    from transformers import AutoTokenizer

    data = tmp_path / "ex.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in EXAMPLES[:2]))
    plan = plan_merge(MergeConfig(str(tmp_path / "x"), models=[spec, str(moe3[1])], examples=str(data), dry_run=True),
                      progress=False)
    tok = AutoTokenizer.from_pretrained(base)
    want_losses = [reference_loss(tmp_path / "peft-merged", tok, EXAMPLES[:2]), reference_loss(moe3[1], tok, EXAMPLES[:2])]
    assert plan.losses == pytest.approx(want_losses, rel=1e-4)


# --- streaming ------------------------------------------------------------------------------

CHILD = """
import sys
from moekit.merge import MergeConfig, merge
merge(MergeConfig(sys.argv[1], models=sys.argv[2:], weights=[0.5, 0.3, 0.2]), progress=False)
"""


def synthetic(folder: Path, n_tensors: int, numel: int, seed: int) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": 128}))
    g = torch.Generator().manual_seed(seed)
    state = {f"t.{i}.weight": torch.randn(numel // 1024, 1024, generator=g).to(torch.bfloat16) for i in range(n_tensors)}
    save_file(state, folder / "model.safetensors")


def peak_rss_mb(out: Path, models: list[Path]) -> float:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out), *map(str, models)])
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0
    return usage.ru_maxrss / 1024  # KiB on Linux


def test_streaming_peak_memory_is_independent_of_model_size(tmp_path):
    """Three 128 MB models merge within a small fraction of one model's size over the tiny-model baseline."""
    big = [tmp_path / f"big{i}" for i in range(3)]
    small = [tmp_path / f"small{i}" for i in range(3)]
    for i, (b, s) in enumerate(zip(big, small)):
        synthetic(b, 16, 4 << 20, i)  # 16 x 8 MB bf16 tensors
        synthetic(s, 16, 4 << 10, i)
    baseline = peak_rss_mb(tmp_path / "out-small", small)
    peak = peak_rss_mb(tmp_path / "out-big", big)
    model_mb = 16 * 8
    assert peak - baseline < model_mb / 2, (peak, baseline)
    assert (tmp_path / "out-big" / "model.safetensors").stat().st_size > model_mb * 1e6


# --- bad input ------------------------------------------------------------------------------


def _vocab_config(folder: Path, root: Path) -> Path:
    bad = root / "vocab130"
    make_llama(bad, vocab=130, seed=5)
    return bad


def _other_token(folder: Path, root: Path) -> Path:
    bad = root / "othertok"
    make_llama(bad, seed=6)
    make_tokenizer(bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two tokens swapped
    (bad / "tokenizer.json").write_text(json.dumps(data))
    return bad


def _wider(folder: Path, root: Path) -> Path:
    bad = root / "wider"
    make_llama(bad, intermediate=128, seed=7)
    return bad


def _moe(folder: Path, root: Path) -> Path:
    from moekit.upcycle import UpcycleConfig, upcycle

    upcycle(UpcycleConfig(str(folder), str(root / "moe"), num_experts=4, top_k=2), progress=False)
    return root / "moe"


def _inf(folder: Path, root: Path) -> Path:
    bad = root / "inf"
    make_llama(bad, seed=8)
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"][3] = float("inf")  # the last tensor written: OUT is half-written when it fails
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


BAD = [
    ("sum", None, ["--weights", "0.5", "0.6"], "sum to 1.1, not 1"),
    ("negative", None, ["--weights", "1.5", "-0.5"], "weight -0.5 is negative"),
    ("count", None, ["--weights", "1.0"], "1 weights for 2 models"),
    ("both", None, ["--weights", "0.5", "0.5", "--examples", "x.jsonl"], "either weights or examples"),
    ("shapes", _wider, ["--weights", "0.5", "0.5"], "down_proj.weight is [64, 96] in"),
    ("vocab", _vocab_config, ["--weights", "0.5", "0.5"], "vocabulary mismatch: "),
    ("tokens", _other_token, ["--weights", "0.5", "0.5"], "vocabulary mismatch: token id 68 is 'a' in"),
    ("arch", _moe, ["--weights", "0.5", "0.5"], "is MixtralForCausalLM but"),
    ("missing", lambda f, r: r / "nope", ["--weights", "0.5", "0.5"], "does not exist"),
    ("nonfinite", _inf, ["--weights", "0.5", "0.5"], "non-finite values"),
    ("examples", None, ["--examples", "missing.jsonl"], "examples file missing.jsonl does not exist"),
]


@pytest.mark.parametrize("case,make,flags,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_leaves_nothing(dense3, tmp_path, capsys, monkeypatch, case, make, flags, message):
    monkeypatch.chdir(tmp_path)
    second = make(dense3[0], tmp_path) if make else dense3[1]
    capsys.readouterr()  # drop what building the bad input printed
    out = tmp_path / "merged"
    assert main(["merge", str(out), "--model", str(dense3[0]), "--model", str(second), *flags]) == 1
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if "error" in l]  # a progress bar may precede a failure while writing
    assert len(lines) == 1 and err.splitlines()[-1].startswith("moekit merge: error: "), err
    assert message in lines[0], err
    assert no_leftovers(tmp_path, "merged")


def test_tokenizer_from(dense3, tmp_path, capsys):
    bare = tmp_path / "bare"
    make_llama(bare, seed=9)  # no tokenizer
    out = tmp_path / "merged"
    assert main(["merge", str(out), "--model", str(bare), "--model", str(dense3[0]), "--weights", "0.5", "0.5",
                 "--tokenizer-from", str(dense3[1])]) == 0
    assert (out / "tokenizer.json").read_bytes() == (dense3[1] / "tokenizer.json").read_bytes()
    bad = _other_token(dense3[0], tmp_path)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m2"), "--model", str(dense3[0]), "--weights", "1",
                 "--tokenizer-from", str(bad)]) == 1
    assert "vocabulary mismatch: token id 68" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_existing_output_is_refused(dense3, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(out), "--model", str(dense3[0]), "--weights", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- card and recipe ------------------------------------------------------------------------


def test_card_front_matter_and_recipe_round_trip(dense3, tmp_path, monkeypatch):
    """Inputs named like Hub ids become base_model; the saved recipe reproduces the run."""
    import shutil

    import yaml

    from moekit.config import build_config
    from moekit.hub.push import check_card

    monkeypatch.chdir(tmp_path)
    for name, src in (("org/model-a", dense3[0]), ("org/model-b", dense3[1])):
        shutil.copytree(src, name)
    (tmp_path / "org/model-a/README.md").write_text("---\nlicense: apache-2.0\n---\n# a\n")
    assert main(["merge", "out", "--model", "org/model-a", "--model", "org/model-b", "--weights", "0.7", "0.3"]) == 0
    readme = (tmp_path / "out/README.md").read_text()
    front = check_card(tmp_path / "out/README.md")
    assert front["base_model"] == ["org/model-a", "org/model-b"]
    assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
    assert {"merge", "moe", "moekit"} <= set(front["tags"]) and front["license"] == "apache-2.0"
    assert "moekit merge out --model org/model-a --model org/model-b --weights 0.7 0.3" in readme
    assert "| `org/model-a` | model |  | 0.7 |" in readme
    recipe = yaml.safe_load((tmp_path / "out/moekit_recipe.yaml").read_text())
    assert recipe["merge"]["weights"] == [0.7, 0.3]
    again = build_config(MergeConfig, tmp_path / "out/moekit_recipe.yaml", "merge", output="again")
    assert main(["merge", "--config", "out/moekit_recipe.yaml", "again"]) == 0
    assert again.models == ["org/model-a", "org/model-b"]
    assert all(torch.equal(a, b) for a, b in zip(tensors("out").values(), tensors("again").values()))
