"""Factored LoRA on fused experts and NF4 experts (moekit.finetune.expert_lora), on CPU.

The reference is PEFT's own ``target_parameters`` forward: the factored forward must give the
same logits and the same LoRA gradients, and with NF4 experts the same as PEFT running on the
dequantized weights. bitsandbytes runs NF4 on CPU, so the quantized path is tested here too.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_finetune import CONFIGS, build, models  # noqa: E402,F401  (models: a fixture)

from moekit.errors import ConfigError  # noqa: E402
from moekit.finetune import FinetuneConfig  # noqa: E402
from moekit.finetune import expert_lora as EL  # noqa: E402
from moekit.finetune.targets import resolve_targets  # noqa: E402


def bnb_or_skip():
    return pytest.importorskip("bitsandbytes")


def peft_moe(arch, target=("attention", "experts"), **overrides):
    """A tiny MoE with LoRA (random B, so the update is not zero) through PEFT, and the plain model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**overrides)) if overrides else build(arch)
    plain = copy.deepcopy(model)
    cfg = resolve_targets(CONFIGS[arch](), list(target), "lora").lora_config(4, 8, 0.0)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0, 0.2)
    return peft_model, plain


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def experts_of(model):
    return [m for m in model.modules() if EL.is_fused_experts(m)]


IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_factored_forward_equals_peft_logits_and_gradients(arch):
    model, _ = peft_moe(arch)
    ref_logits, ref_grads = loss_and_grads(model, IDS)
    counts = EL.install(model, quantize=False)
    assert counts["wrapped"] == (2 if arch == "mixtral" else 1) and counts["quantized"] == 0
    logits, grads = loss_and_grads(model, IDS)
    assert grads.keys() == ref_grads.keys() and any(".experts." in n for n in grads)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4)


def test_factored_forward_under_bf16_autocast_matches_peft():
    """bf16 autocast, as on GPUs: the casts of the LoRA path and the 4-bit path keep PEFT's numerics
    (differences of bf16 rounding only)."""
    bnb_or_skip()
    model, _ = peft_moe("qwen2_moe", moe_intermediate_size=32)
    for name, p in model.named_parameters():  # a bf16 base with fp32 LoRA factors, as PEFT makes for QLoRA
        if "lora_" not in name:
            p.data = p.data.bfloat16()
    reference = copy.deepcopy(model)
    EL.install(model, quantize=True)
    with torch.no_grad():
        for q, ref in zip(experts_of(model), experts_of(reference)):
            for name in EL.EXPERT_WEIGHTS:
                getattr(ref, name).copy_(getattr(q, name).dequantize())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_grads = loss_and_grads(reference, IDS)
        logits, grads = loss_and_grads(model, IDS)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(logits, ref_logits) < 0.02
    assert grads.keys() == ref_grads.keys()
    assert max(rel(grads[n], ref_grads[n]) for n in grads) < 0.05


def test_merged_adapter_on_bf16_experts_is_not_applied_twice():
    model, plain = peft_moe("mixtral")
    EL.install(model, quantize=False)
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        model.merge_adapter()  # PEFT folds ΔW into the expert weights; the factored forward must skip it
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
        with model.disable_adapter():  # unmerges on the way, like PEFT's own forward
            torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_two_active_adapters_are_refused_with_the_fix():
    model, _ = peft_moe("mixtral")
    model.add_adapter("second", resolve_targets(CONFIGS["mixtral"](), ["experts"], "lora").lora_config(4, 8, 0.0))
    EL.install(model, quantize=False)
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ConfigError, match="one active adapter at a time"):
        model(input_ids=IDS)


def test_merging_into_packed_experts_is_refused():
    bnb_or_skip()
    model, _ = peft_moe("mixtral")
    EL.install(model, quantize=True)
    with pytest.raises(ConfigError, match="merge it into the unquantized base"):
        model.merge_and_unload()
    with pytest.raises(ConfigError, match="cannot be merged or saved whole"):
        model.get_base_model().save_pretrained("anywhere")


def test_attention_only_adapter_over_packed_experts_cannot_be_merged_either(tmp_path):
    """Experts packed but not LoRA-wrapped: a merge would still drop them from the saved model."""
    bnb_or_skip()
    model, _ = peft_moe("mixtral", ("attention",))
    EL.install(model, quantize=True)
    with pytest.raises(ConfigError, match="cannot be merged or saved whole"):
        model.merge_and_unload()
    model.save_pretrained(tmp_path / "adapter")  # the adapter itself saves as always
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_disabled_adapter_gives_the_base_model():
    model, plain = peft_moe("mixtral")
    EL.install(model, quantize=False)
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=IDS).logits
        on = model(input_ids=IDS).logits
        base = plain(input_ids=IDS).logits
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    assert (on - base).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("target", [("attention", "experts"), ("attention",)])
def test_nf4_experts_equal_peft_on_their_dequantized_weights(target):
    bnb_or_skip()
    # experts of 32: rows of 32 values, which bitsandbytes' CPU kernel dequantizes wrongly as 2-D weights
    model, _ = peft_moe("qwen2_moe", target, moe_intermediate_size=32)
    reference = copy.deepcopy(model)
    originals = [getattr(experts_of(model)[0], n).detach().clone() for n in EL.EXPERT_WEIGHTS]
    counts = EL.install(model, quantize=True)
    assert counts["quantized"] == 1 and counts["wrapped"] == (1 if "experts" in target else 0)
    packed = experts_of(model)[0]
    assert isinstance(packed.gate_up_proj, EL.Packed4bit) and "gate_up_proj" not in dict(packed.named_parameters())
    # NF4 costs about a quarter of bf16 (an eighth of these fp32 test weights), and stays close to the original
    assert packed.gate_up_proj.packed.numel() <= originals[0].numel() // 2
    for name, original in zip(EL.EXPERT_WEIGHTS, originals):  # NF4's rounding: about 9% of the norm
        deq = getattr(packed, name).dequantize()
        assert deq.shape == original.shape and (deq - original).norm() < 0.12 * original.norm()
    with torch.no_grad():
        for q, ref in zip(experts_of(model), experts_of(reference)):
            for name in EL.EXPERT_WEIGHTS:
                getattr(ref, name).copy_(getattr(q, name).dequantize())
    ref_logits, ref_grads = loss_and_grads(reference, IDS)
    logits, grads = loss_and_grads(model, IDS)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4)


def lora_trainer(model, model_dir, run, *, steps: int, examples: int, save_steps: int = 500):
    """TRL SFTTrainer + PEFT LoRA on attention and experts over ``model``, on a repeated sentence."""
    import datasets

    from moekit.train import trainer as T
    from moekit.train.options import TrainingOptions

    options = TrainingOptions(max_length=48, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              max_steps=steps, learning_rate=1e-2, warmup_steps=0, lr_scheduler_type="constant",
                              logging_steps=1, save_steps=save_steps, report_to=["none"], seed=0)
    args = T.sft_config(options, run, prec=T.precision(options, adapters=True), progress=False, evaluate=False,
                        router_aux_loss_coef=0.0)
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the red hat " * 3] * examples})
    targets = resolve_targets(model.config, ["attention", "experts"], "qlora")
    return T.build_trainer(model, T.load_tokenizer(model_dir), data, None, args,
                           peft_config=targets.lora_config(4, 8, 0.0))


def losses_of(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def sft_run(model_dir, run, *, factored: bool, steps: int = 8, resume: str | None = None):
    """LoRA on attention and experts; ``factored``: experts NF4 and factored."""
    from moekit.train import trainer as T

    trainer = lora_trainer(T.load_model(model_dir, dtype="float32", moe=True), model_dir, run, steps=steps,
                           examples=16, save_steps=2)
    if factored:
        EL.install(trainer.model, quantize=True)
    before = {n: t.detach().clone() for n, t in [*trainer.model.named_parameters(), *trainer.model.named_buffers()]
              if ".experts." in n}
    T.train(trainer, resume)
    return trainer, before, losses_of(trainer)


def test_sft_trainer_on_nf4_experts_learns_like_peft_and_the_adapter_reloads(models, tmp_path):
    """The whole path on CPU: TRL SFTTrainer + PEFT, experts NF4 and factored, adapter saved by PEFT."""
    bnb_or_skip()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = models / "mixtral"
    _, _, stock = sft_run(model_dir, tmp_path / "stock", factored=False)
    trainer, before, losses = sft_run(model_dir, tmp_path / "nf4", factored=True)
    assert losses[-1] < losses[0] - 0.2  # it learns ...
    assert max(abs(a - b) for a, b in zip(losses, stock)) < 0.02  # ... as PEFT does on the unquantized experts
    model = trainer.model
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in before:  # LoRA factors moved, the packed base did not
            assert torch.equal(t, before[name]) == (".packed" in name), name
    model.save_pretrained(tmp_path / "adapter")
    # PEFT's stock loader on the dequantized base reproduces the trained model
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for q, ref in zip(experts_of(model), experts_of(base)):
            for name in EL.EXPERT_WEIGHTS:
                getattr(ref, name).copy_(getattr(q, name).dequantize())
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        ids = torch.randint(3, 100, (1, 20))
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_resume_with_nf4_experts_continues_exactly(models, tmp_path):
    """An interrupted run resumed from its checkpoint ends where an uninterrupted one does."""
    bnb_or_skip()
    model_dir = models / "mixtral"
    straight, _, expected = sft_run(model_dir, tmp_path / "straight", factored=True, steps=4)
    sft_run(model_dir, tmp_path / "cut", factored=True, steps=2)  # "interrupted" after its step-2 checkpoint
    resumed, _, losses = sft_run(model_dir, tmp_path / "cut", factored=True, steps=4,
                                 resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert losses == pytest.approx(expected, abs=1e-5)  # steps 3 and 4 trained again the same way
    lora = lambda t: {n: p for n, p in t.model.named_parameters() if "lora_" in n}
    for name, p in lora(straight).items():
        torch.testing.assert_close(lora(resumed)[name], p, atol=1e-6, rtol=0)


def qlora_cpu_run(model_dir, run, *, staged: bool) -> list[float]:
    """moekit's QLoRA flow with the CPU as the device: 3 steps, losses."""
    from moekit.finetune.run import STAGED, factor_experts, load_staged
    from moekit.finetune.targets import quantization_skip_modules
    from moekit.train import trainer as T

    bnb = bnb_or_skip()
    cfg = T.load_model_config(model_dir, "a MoE")
    load = dict(dtype="float32", moe=True, quantization_config=T.bnb_4bit_config(quantization_skip_modules(cfg),
                                                                                compute_dtype="float32"))
    device = torch.device("cpu")
    model = load_staged(model_dir, load, device) if staged else T.load_model(model_dir, **load, device_map={"": "cpu"})
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert getattr(model, STAGED, None) == (device if staged else None)
    trainer = lora_trainer(model, model_dir, run, steps=3, examples=12)
    factor_experts(trainer.model, quantize=True, device=getattr(model, STAGED, None))
    assert all(isinstance(m.gate_up_proj, EL.Packed4bit) for m in experts_of(trainer.model))
    T.train(trainer)
    return losses_of(trainer)


def test_qlora_flow_on_cpu_staged_and_direct_train_alike(models, tmp_path):
    """QLoRA as moekit runs it, on the CPU (bitsandbytes runs there): 4-bit linear layers, experts
    packed after PEFT wrapped them. Staged is the path for experts larger than the GPU (loaded on the
    CPU, everything else moved, experts packed onto the device), here with the CPU as the device."""
    direct = qlora_cpu_run(models / "mixtral", tmp_path / "direct", staged=False)
    staged = qlora_cpu_run(models / "mixtral", tmp_path / "staged", staged=True)
    assert len(direct) == 3 and direct[-1] < direct[0]
    assert staged == pytest.approx(direct, abs=1e-6)


def test_experts_trained_in_full_are_not_quantized():
    bnb_or_skip()
    model = build("mixtral")
    with pytest.raises(ConfigError, match="train the experts with LoRA"):
        EL.install(model, quantize=True)


def test_quantize_experts_is_a_qlora_setting():
    assert FinetuneConfig("m", "o", data="d", method="qlora").quantize_experts is True
    assert FinetuneConfig("m", "o", data="d", method="qlora", quantize_experts=False).quantize_experts is False
    with pytest.raises(ConfigError, match="quantize_experts applies to method=qlora"):
        FinetuneConfig("m", "o", data="d", method="lora", quantize_experts=True)
