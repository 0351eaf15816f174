"""moekit finetune: targeting per architecture, masking, training, outputs, errors (CPU, tiny models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import make_llama, make_tokenizer  # noqa: E402

from moekit.cli.main import main  # noqa: E402
from moekit.errors import ConfigError  # noqa: E402
from moekit.finetune import FinetuneConfig  # noqa: E402
from moekit.finetune.targets import resolve_targets, select_parameters  # noqa: E402
from moekit.train.options import run_dir  # noqa: E402

H, I_DENSE, L, VOCAB = 64, 96, 2, 128
E, I_EXPERT, SHARED = 4, 24, 48
R = 4
WORDS = ["cat", "dog", "sun", "red", "big", "low", "sky", "hat"]


# --- tiny models ---------------------------------------------------------------------------


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=I_EXPERT, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def qwen_config(**overrides):
    """Layer 0 sparse (experts + shared expert), layer 1 dense (mlp_only_layers)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=I_DENSE, moe_intermediate_size=I_EXPERT,
        shared_expert_intermediate_size=SHARED, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
        num_experts=E, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=128,
        use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=0), **overrides})


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=I_DENSE, num_hidden_layers=L,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen_config, "llama": llama_config}


def build(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved tiny models with the character tokenizer: mixtral (via moekit upcycle), qwen2_moe, llama."""
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("models")
    make_llama(root / "llama")
    make_tokenizer(root / "llama")
    upcycle(UpcycleConfig(str(root / "llama"), str(root / "mixtral"), num_experts=E, top_k=2, router="random"),
            progress=False)
    make_tokenizer(root / "mixtral")
    model = build("qwen2_moe")
    with torch.no_grad():  # Qwen2-MoE inits its router to zeros: break the tie so routing varies
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(root / "qwen2_moe")
    make_tokenizer(root / "qwen2_moe")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("data")
    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}!"}]}
            for w in WORDS * 3]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    pc = [{"prompt": f"Q: twice {w}? A:", "completion": f" {w}{w}"} for w in WORDS * 3]
    datasets.Dataset.from_list(pc).to_parquet(str(root / "pc.parquet"))
    alpaca = [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w}"} for w in WORDS * 3]
    (root / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca) + "\n")
    (root / "text.txt").write_text("\n\n".join(f"the {w} is {w} and the {w} stays {w}." for w in WORDS * 3))
    (root / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    return root


def fast(model, output, data, **kw):
    """A FinetuneConfig for a few CPU steps."""
    defaults = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
                    logging_steps=1, save_steps=100, warmup_steps=0, lora_r=R, lora_alpha=2 * R, max_length=64,
                    report_to=["none"])
    return FinetuneConfig(str(model), str(output), data=str(data), **{**defaults, **kw})


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))


# --- targeting: each target selects exactly its parameters -----------------------------------


def group_of(name: str) -> str:
    """The test's own reading of parameter names (independent of moekit's)."""
    if "self_attn" in name:
        return "attention"
    if ".shared_expert" in name:
        return "shared"
    if ".experts." in name:
        return "experts"
    if re.search(r"\.mlp\.gate\.", name) or name.endswith(".mlp.gate.weight"):
        return "router"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.", name):
        return "mlp"
    return "other"


def expected(arch: str, groups: list[str], method: str) -> dict[str, int]:
    """Trainable parameters per group, from the shapes alone."""
    q, kv = H, 2 * (H // 4)  # 4 heads of 16, 2 kv heads
    moe_layers = {"mixtral": L, "qwen2_moe": 1, "llama": 0}[arch]
    dense_layers = L - moe_layers
    bias = q + 2 * kv if arch == "qwen2_moe" else 0
    lora = lambda fan_in, fan_out: R * (fan_in + fan_out)
    if method == "full":
        sizes = {"attention": L * (H * q + 2 * H * kv + q * H + bias), "experts": moe_layers * E * 3 * I_EXPERT * H,
                 "router": moe_layers * E * H, "shared": moe_layers * (3 * SHARED * H + H),
                 "mlp": dense_layers * 3 * I_DENSE * H}
    else:
        sizes = {
            "attention": L * (lora(H, q) + 2 * lora(H, kv) + lora(q, H)),
            # PEFT's LoRA on a fused [E, out, in] parameter: A [r*E, in], B [out, r*E]
            "experts": moe_layers * (R * E * (H + 2 * I_EXPERT) + R * E * (I_EXPERT + H)),
            "router": moe_layers * E * H,  # trained in full (modules_to_save)
            "shared": moe_layers * (2 * lora(H, SHARED) + lora(SHARED, H) + H),  # + the shared gate in full
            "mlp": dense_layers * (2 * lora(H, I_DENSE) + lora(I_DENSE, H)),
        }
    return {g: sizes[g] for g in groups}


CASES = [
    ("mixtral", "attention", "lora", ["attention"]),
    ("mixtral", "experts", "lora", ["experts"]),
    ("mixtral", "attention,experts", "lora", ["attention", "experts"]),
    ("mixtral", "attention,router", "lora", ["attention", "router"]),
    ("mixtral", "all", "lora", ["attention", "experts", "router"]),
    ("mixtral", "router", "full", ["router"]),
    ("mixtral", "experts", "full", ["experts"]),
    ("mixtral", None, "full", ["attention", "experts"]),
    ("qwen2_moe", "attention,router", "lora", ["attention", "router"]),
    ("qwen2_moe", "shared", "lora", ["shared"]),
    ("qwen2_moe", "mlp", "lora", ["mlp"]),
    ("qwen2_moe", "all", "lora", ["attention", "experts", "router", "shared", "mlp"]),
    ("qwen2_moe", "all", "full", ["attention", "experts", "router", "shared", "mlp"]),
    ("llama", "attention,mlp", "lora", ["attention", "mlp"]),
    ("llama", None, "lora", ["attention"]),
]


@pytest.mark.parametrize("arch,target,method,groups", CASES, ids=[f"{a}-{t}-{m}" for a, t, m, _ in CASES])
def test_target_selects_exactly_its_parameters(arch, target, method, groups):
    from peft import get_peft_model

    model = build(arch)
    cfg = FinetuneConfig("m", "o", data="d", method=method, target=target, lora_r=R)
    targets = resolve_targets(model.config, cfg.target, method)
    assert targets.groups == groups
    if method == "full":
        select_parameters(model, targets)
    else:
        model = get_peft_model(model, targets.lora_config(R, 2 * R, 0.0))
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[group_of(name)] = counts.get(group_of(name), 0) + p.numel()
    assert counts == expected(arch, groups, method)


def test_targets_the_model_lacks_are_refused():
    with pytest.raises(ConfigError, match="this llama model has no experts to train — its targets are attention, mlp"):
        resolve_targets(llama_config(), ["experts"], "lora")
    with pytest.raises(ConfigError, match="no shared to train"):
        resolve_targets(mixtral_config(), ["shared"], "lora")
    with pytest.raises(ConfigError, match="target router alone has no LoRA layers"):
        resolve_targets(mixtral_config(), ["router"], "lora")
    with pytest.raises(ConfigError, match="lora_dropout=0.1 cannot be used with target experts"):
        resolve_targets(mixtral_config(), ["all"], "lora", lora_dropout=0.1)
    assert resolve_targets(llama_config(), ["all"], "lora", lora_dropout=0.1).groups == ["attention", "mlp"]


def test_config_errors_name_the_field_and_fix():
    with pytest.raises(ConfigError, match=r"unknown target 'experst' — valid --target values: attention, experts"):
        FinetuneConfig("m", "o", data="d", target="attention,experst")
    with pytest.raises(ConfigError, match="set --lora-dropout 0 or drop experts"):
        FinetuneConfig("m", "o", data="d", target="experts", lora_dropout=0.05)
    with pytest.raises(ConfigError, match="needs the router trained"):
        FinetuneConfig("m", "o", data="d", target="attention", router_aux_loss_coef=0.01)
    with pytest.raises(ConfigError, match="merge applies to lora/qlora"):
        FinetuneConfig("m", "o", data="d", method="full", merge=True)
    with pytest.raises(ConfigError, match="trainer_args.weight_decy is not an SFTConfig field"):
        FinetuneConfig("m", "o", data="d", trainer_args={"weight_decy": 0.1})
    assert FinetuneConfig("m", "o", data="d", method="full").learning_rate == 2e-5  # explicit, per method


# --- data: formats and loss masks -----------------------------------------------------------


def test_formats_are_recognised_and_alpaca_becomes_prompt_completion(data):
    from moekit.train.data import alpaca_to_prompt_completion, detect_format, load_source

    assert detect_format(load_source(str(data / "chat.jsonl")).column_names) == "messages"
    assert detect_format(load_source(str(data / "pc.parquet")).column_names) == "prompt_completion"
    assert detect_format(load_source(str(data / "alpaca.jsonl")).column_names) == "alpaca"
    assert detect_format(load_source(str(data / "text.txt")).column_names) == "text"
    row = {"instruction": "Add", "input": "1 2", "output": "3"}
    plain = alpaca_to_prompt_completion(row, chat=False)
    assert plain["prompt"].endswith("### Input:\n1 2\n\n### Response:\n") and plain["completion"] == "3"
    chat = alpaca_to_prompt_completion(row, chat=True)
    assert chat["prompt"] == [{"role": "user", "content": "Add\n\n1 2"}]


def test_chat_labels_train_only_assistant_turns():
    from moekit.train.data import chat_labels

    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]
    out = chat_labels(tok, msgs)
    assert len(out["input_ids"]) == len(out["labels"])
    kept = [t for t, l in zip(out["input_ids"], out["labels"]) if l != -100]
    assert tok.decode(kept) == "yo</s>fine</s>"  # the user turns and role headers are masked


def test_sharegpt_conversations_become_masked_messages():
    import datasets

    from moekit.train.data import detect_format, to_sft_dataset

    ds = datasets.Dataset.from_list([{"id": 1, "conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "yo"}]}])
    tok = make_tokenizer()
    row = to_sft_dataset(ds, detect_format(ds.column_names), tok)[0]
    assert tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == "yo</s>"


# --- training runs ---------------------------------------------------------------------------


def test_lora_attention_experts_chat_merge(models, data, tmp_path):
    """Mixtral, LoRA on attention + experts, chat data, held-out split, --merge."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moekit.finetune import finetune

    out = tmp_path / "sft"
    res = finetune(fast(models / "mixtral", out, data / "chat.jsonl", target="attention,experts", merge=True,
                        eval_fraction=0.25, report_to=["tensorboard"]), progress=False)
    tok = res.trainer.processing_class
    for row in res.trainer.train_dataset.select(range(3)):  # assistant-only loss: prompt tokens are -100
        kept = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
        reply = tok.decode(kept)
        assert re.fullmatch(r"(\w+) \1!</s>", reply) and row["labels"][0] == -100
    assert res.metrics["last_loss"] < res.metrics["first_loss"]
    assert "eval_loss" in res.metrics

    base = AutoModelForCausalLM.from_pretrained(models / "mixtral")
    base_logits = logits(base, IDS)
    trained = logits(res.trainer.model, IDS)
    adapter = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "mixtral"), out), IDS)
    merged_model = AutoModelForCausalLM.from_pretrained(out / "merged")
    merged = logits(merged_model, IDS)
    assert (trained - base_logits).abs().max() > 1e-3  # the adapter changed something
    assert (adapter - trained).abs().max() < 1e-5  # adapter round-trips
    assert (merged - adapter).abs().max() < 1e-4  # merge == adapter
    base_sd, merged_sd = base.state_dict(), merged_model.state_dict()
    for layer in range(L):  # frozen router: bit-identical
        key = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(base_sd[key], merged_sd[key])
    assert not torch.equal(base_sd["model.layers.0.mlp.experts.down_proj"], merged_sd["model.layers.0.mlp.experts.down_proj"])

    recipe = FinetuneConfig(**yaml.safe_load((out / "moekit_recipe.yaml").read_text())["finetune"])
    assert recipe.target == ["attention", "experts"] and recipe.merge and not recipe.resume_from_checkpoint
    assert recipe.router_aux_loss_coef == 0.0 and not res.trainer.aux_loss_enabled  # frozen router: no aux loss
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "assistant turns" in card and "moekit_recipe.yaml" in card
    assert "library_name: transformers" in (out / "merged" / "README.md").read_text()
    assert list((out / "runs").rglob("events.out.tfevents*"))
    assert any("eval_loss" in e for e in json.loads((out / "moekit_train_log.json").read_text()))
    assert not run_dir(out).exists()


def test_lora_all_qwen_prompt_completion_with_aux_loss(models, data, tmp_path):
    """Qwen2-MoE (shared expert, dense layer), every group, completion-only loss, router trained with aux loss."""
    from moekit.finetune import finetune

    res = finetune(fast(models / "qwen2_moe", tmp_path / "sft", data / "pc.parquet", target="all",
                        router_aux_loss_coef=0.01), progress=False)
    tok = res.trainer.processing_class
    for row in res.trainer.train_dataset.select(range(3)):  # completion-only: every prompt token is -100
        n_prompt = next(i for i, l in enumerate(row["labels"]) if l != -100)
        assert tok.decode(row["input_ids"][:n_prompt]).startswith("Q: twice ")
        assert tok.decode(row["input_ids"][:n_prompt]).endswith("? A:")
        assert all(l != -100 for l in row["labels"][n_prompt:])
    assert set(res.trainable) == {"attention", "experts", "router", "shared", "mlp"}
    assert any("aux_loss" in e for e in res.trainer.state.log_history)
    assert res.metrics["last_loss"] < res.metrics["first_loss"]
    assert res.trainer.model.config.output_router_logits is False  # restored for saving


def test_cli_full_experts_on_text_keeps_everything_else(models, data, tmp_path, capsys):
    """Full fine-tuning of the experts only: router, attention and embeddings bit-identical, stock checkpoint."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    rc = main(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "text.txt"), "--method", "full",
               "--target", "experts", "--max-steps", "4", "--per-device-train-batch-size", "4",
               "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3", "--packing", "--max-length", "64",
               "--report-to", "none", "--save-steps", "100", "--logging-steps", "1"])
    assert rc == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(models / "mixtral").state_dict()
    tuned_model = AutoModelForCausalLM.from_pretrained(out)
    assert tuned_model.config.output_router_logits is False
    tuned = tuned_model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".mlp.experts." in k for k in changed)
    assert "library_name: transformers" in (out / "README.md").read_text()
    assert not (out / "adapter_config.json").exists() and not (out / "training_args.bin").exists()


def test_interrupted_run_leaves_no_output_and_resumes(models, data, tmp_path):
    """Dense LLaMA + Alpaca: a crash after a checkpoint leaves no OUT; --resume finishes the run."""
    from transformers import TrainerCallback

    from moekit.finetune import finetune

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise RuntimeError("power cut")

    out = tmp_path / "sft"
    cfg = fast(models / "llama", out, data / "alpaca.jsonl", max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="power cut"):
        finetune(cfg, progress=False, callbacks=[Crash()])
    assert not out.exists() and (run_dir(out) / "checkpoint-2").is_dir()
    with pytest.raises(ConfigError, match="interrupted run .* pass --resume to continue it or --force"):
        finetune(cfg, progress=False)
    seen = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(state.global_step)

    res = finetune(fast(models / "llama", out, data / "alpaca.jsonl", max_steps=4, save_steps=2,
                        resume_from_checkpoint=True), progress=False, callbacks=[Steps()])
    assert seen == [3, 4]  # resumed after checkpoint-2, not restarted
    assert [e["step"] for e in res.trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").is_file() and not run_dir(out).exists()


# --- bad input: one line, exit 1, nothing written ---------------------------------------------


def _fails(argv, capsys, match, out):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists() and not run_dir(out).exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("extra,match", [
    (["--target", "attention,expert"], r"moekit finetune: error: unknown target 'expert' — valid --target values"),
    (["--target", "experts", "--lora-dropout", "0.1"], r"lora_dropout=0.1 cannot be used with target experts"),
    (["--target", "all", "--lora-dropout", "0.1"], r"lora_dropout=0.1 cannot be used with target experts"),
    (["--target", "shared"], r"this mixtral model has no shared to train"),
], ids=["unknown-target", "dropout-experts", "dropout-all", "missing-group"])
def test_bad_targets_are_one_line(models, data, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    _fails(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "chat.jsonl"), *extra],
           capsys, match, out)


def test_data_without_needed_columns_is_one_line(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "bad.jsonl")], capsys,
           r"has columns answer, question — training needs messages, prompt\+completion, instruction\+output", out)
    _fails(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "missing.jsonl")], capsys,
           r"data file .*missing.jsonl does not exist", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_qlora_without_cuda_is_one_line(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "chat.jsonl"), "--method", "qlora"],
           capsys, r"method=qlora needs a CUDA GPU .* use --method lora", out)


def test_existing_output_is_refused(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["finetune", str(models / "mixtral"), str(out), "--data", str(data / "chat.jsonl")]) == 1
    assert "already exists" in capsys.readouterr().err and not any(out.iterdir())


# --- cards, launch ---------------------------------------------------------------------------


def test_cards_name_base_model_and_relation():
    import yaml

    import tempfile

    from moekit.finetune.card import finetune_card
    from moekit.hub.push import check_card

    cfg = FinetuneConfig("org/moe", "moe-sft", data="chat.jsonl", target="attention")
    info = {"format": "messages", "examples": 10, "trainable": {"attention": 100}, "total_params": 1000,
            "steps": 5, "first_loss": 2.0, "last_loss": 1.0}
    for kind, relation, library in (("adapter", "adapter", "peft"), ("merged", "finetune", "transformers"),
                                    ("full", "finetune", "transformers")):
        for method in ("lora", "qlora", "full"):
            cfg.method = method
            card = finetune_card(cfg, kind=kind, info=info, recipe="finetune: {}\n", model_dir=".")
            meta = yaml.safe_load(card.split("---")[1])
            assert meta["base_model"] == "org/moe" and meta["base_model_relation"] == relation
            assert meta["library_name"] == library and "chat.jsonl" in card
            readme = Path(tempfile.mkdtemp()) / "README.md"
            readme.write_text(card)
            check_card(readme, library)  # `moekit push` accepts what finetune writes


def test_qlora_card_says_where_the_experts_are():
    from moekit.finetune.card import finetune_card

    info = {"format": "messages", "examples": 10, "trainable": {"attention": 100}, "total_params": 1000}
    row = lambda cfg, moe: next(l for l in finetune_card(cfg, kind="adapter", info={**info, "moe": moe},
                                                         recipe="", model_dir=".").splitlines() if "base in 4-bit" in l)
    packed = FinetuneConfig("org/moe", "o", data="d", method="qlora", target="attention")
    bf16 = FinetuneConfig("org/moe", "o", data="d", method="qlora", target="attention", quantize_experts=False)
    assert "fused experts packed to NF4" in row(packed, True)
    assert "fused experts and routers in bf16" in row(bf16, True)
    assert "experts" not in row(packed, False)  # a dense LLaMA has none


def test_packed_experts_are_refused_under_fsdp_and_deepspeed(monkeypatch):
    from moekit.finetune.run import check_packed_experts_parallelism

    check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora"))  # one GPU / DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="not FSDP — use --accelerate-config ddp, or --no-quantize-experts"):
        check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora"))
    check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora", quantize_experts=False))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError, match="not DeepSpeed"):  # the launching process reads the accelerate YAML
        check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora", accelerate_config="zero3"))
    with pytest.raises(ConfigError, match="not FSDP"):
        check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora",
                                                        trainer_args={"fsdp": "full_shard"}))
    check_packed_experts_parallelism(FinetuneConfig("m", "o", data="d", method="qlora", accelerate_config="ddp"))


def test_accelerate_relaunch_runs_the_resolved_recipe(monkeypatch):
    import accelerate.commands.launch as launch_mod

    from moekit.train.launch import SHIPPED, accelerate_config_path, relaunch

    assert all(accelerate_config_path(n).is_file() for n in SHIPPED)
    seen = {}

    def fake_launch(args):
        seen["args"] = args
        seen["recipe"] = open(args.training_script_args[-1]).read()

    monkeypatch.setattr(launch_mod, "launch_command", fake_launch)
    cfg = FinetuneConfig("m", "o", data="d", accelerate_config="ddp", num_processes=2, target="attention")
    assert relaunch(cfg, "finetune") == 0
    args = seen["args"]
    assert args.module and args.training_script == "moekit.cli.main" and args.num_processes == 2
    assert args.training_script_args[:2] == ["finetune", "--config"]
    assert "accelerate_config: null" in seen["recipe"] and "target:\n  - attention" in seen["recipe"]
    with pytest.raises(ConfigError, match="accelerate_config='dpp' is neither a shipped config"):
        FinetuneConfig("m", "o", data="d", accelerate_config="dpp")
