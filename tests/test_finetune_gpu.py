"""moekit finetune on CUDA: QLoRA (4-bit nn.Linear, NF4 or bf16 fused experts) and LoRA with grouped_mm experts.

Skipped without CUDA (and, for QLoRA, without bitsandbytes). Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

pytest.importorskip("peft")
pytest.importorskip("trl")

from conftest import make_llama, make_tokenizer  # noqa: E402

WORDS = ["cat", "dog", "sun", "red", "big", "low", "sky", "hat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("gpu")
    # hidden 128 / 4 experts of 64: shapes bitsandbytes' 4-bit blocks handle
    make_llama(root / "llama", hidden=128, intermediate=256, heads=4, kv_heads=2, dtype=torch.bfloat16)
    make_tokenizer(root / "llama")
    upcycle(UpcycleConfig(str(root / "llama"), str(root / "moe"), num_experts=4, top_k=2, router="random"),
            progress=False)
    make_tokenizer(root / "moe")
    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}!"}]}
            for w in WORDS * 4]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    return root


def config(setup, out, **kw):
    from moekit.finetune import FinetuneConfig

    base = dict(max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                logging_steps=1, save_steps=100, warmup_steps=0, max_length=64, report_to=["none"],
                target="attention,experts")
    return FinetuneConfig(str(setup / "moe"), str(out), data=str(setup / "chat.jsonl"), **{**base, **kw})


@pytest.mark.parametrize("quantize_experts", [True, False])
def test_qlora_4bit_linear_and_experts(setup, tmp_path, caplog, quantize_experts):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moekit.finetune import finetune
    from moekit.finetune.expert_lora import Packed4bit

    out = tmp_path / "qlora"
    with caplog.at_level(logging.INFO, logger="moekit"):
        res = finetune(config(setup, out, method="qlora", merge=True, quantize_experts=quantize_experts),
                       progress=False)
    assert "per-expert loop (factored LoRA) on 2 LoRA-wrapped layers" in caplog.text
    model = res.trainer.model.get_base_model()
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # kept out of quantization
    experts = layer.mlp.experts.get_base_layer()
    if quantize_experts:
        assert isinstance(experts.gate_up_proj, Packed4bit) and experts.gate_up_proj.packed.is_cuda
        assert "packed to NF4" in caplog.text
    else:
        assert experts.gate_up_proj.dtype == torch.bfloat16 and "kept in bf16" in caplog.text
    assert layer.mlp.gate.weight.dtype == torch.bfloat16
    assert res.metrics["last_loss"] < res.metrics["first_loss"]
    # the adapter loads on the unquantized base; the merged checkpoint loads stock
    base = AutoModelForCausalLM.from_pretrained(setup / "moe", dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.randint(3, 100, (1, 12))
    assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_qlora_experts_staged_on_the_cpu_train_like_the_direct_load(setup, tmp_path, caplog, monkeypatch):
    """Experts too large for the GPU: loaded on the CPU, packed onto the GPU one at a time."""
    pytest.importorskip("bitsandbytes")
    import moekit.finetune.run as run_mod
    from moekit.finetune import finetune

    direct = finetune(config(setup, tmp_path / "direct", method="qlora"), progress=False)
    monkeypatch.setattr(run_mod, "experts_fit_gpu", lambda nbytes: False)
    with caplog.at_level(logging.INFO, logger="moekit"):
        staged = finetune(config(setup, tmp_path / "staged", method="qlora"), progress=False)
    assert "loading the model into CPU memory first" in caplog.text
    model = staged.trainer.model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {b.device.type for b in model.buffers()} == {"cuda"}
    from moekit.finetune.expert_lora import Packed4bit

    packed = [m for m in model.modules() if isinstance(m, Packed4bit)]
    assert packed and all(s.absmax.is_cuda and s.state2.absmax.is_cuda for m in packed for s in m.states)
    losses = lambda r: [e["loss"] for e in r.trainer.state.log_history if "loss" in e]
    assert losses(staged) == pytest.approx(losses(direct), abs=2e-2)


def test_lora_on_cuda_uses_grouped_mm_and_bf16(setup, tmp_path, caplog):
    from moekit.finetune import finetune

    with caplog.at_level(logging.INFO, logger="moekit"):
        res = finetune(config(setup, tmp_path / "lora"), progress=False)
    assert "experts: grouped_mm on CUDA" in caplog.text
    assert res.trainer.args.bf16 == torch.cuda.is_bf16_supported()
    assert res.metrics["last_loss"] < res.metrics["first_loss"]
    devices = {p.device.type for n, p in res.trainer.model.named_parameters() if ".experts." in n}
    assert devices == {"cuda"}
