"""Model cards for fine-tuning outputs: the adapter, the merged model, a full fine-tune."""

from __future__ import annotations

from moekit.hub.card import fenced, render_card, source_license, table

RELATION = {"adapter": "adapter", "merged": "finetune", "full": "finetune"}


def hub_id(model: str) -> str | None:
    """``model`` when it names a Hub repo (cards may only point there), else None."""
    from pathlib import Path

    if model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") != 1:
        return None
    return model


def finetune_card(config, *, kind: str, info: dict, recipe: str, model_dir) -> str:
    """README.md for ``kind`` = ``adapter`` | ``merged`` | ``full``.

    ``info`` holds ``format``, ``examples``, ``eval_examples``, ``trainable`` ({group: count}),
    ``total_params`` and the loss summary (``steps``, ``first_loss``, ``last_loss``, ``eval_loss``).
    """
    base = hub_id(config.model)
    trainable = ", ".join(f"{g} {n:,}" for g, n in info["trainable"].items())
    rows = [
        ("base model", f"`{config.model}`"),
        ("method", config.method + (f" (base in 4-bit NF4{_experts_in(config, info)})"
                                    if config.method == "qlora" else "")),
        ("targets", ", ".join(config.target)),
        ("trainable parameters", f"{sum(info['trainable'].values()):,} of {info['total_params']:,} ({trainable})"),
        ("data", f"`{config.data}` ({info['format']}, {info['examples']:,} examples"
                 + (f", {info['eval_examples']:,} held out" if info.get("eval_examples") else "") + ")"),
        ("loss on", _loss_on(config, info["format"])),
        ("steps", info.get("steps", "?")),
        ("training loss", _fmt(info.get("first_loss")) + " → " + _fmt(info.get("last_loss"))),
    ]
    if "eval_loss" in info:
        rows.append(("held-out loss", _fmt(info["eval_loss"])))
    if config.method != "full":
        rows.append(("LoRA", f"r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}"))
    body = "\n\n".join([
        _intro(config, kind),
        table(rows, ("setting", "value")),
        "## Usage\n\n" + fenced(_usage(config, kind), "python"),
        "## Reproduce\n\n" + fenced("moekit finetune --config moekit_recipe.yaml", "bash")
        + "\n\nResolved recipe (`moekit_recipe.yaml`):\n\n" + fenced(recipe, "yaml")
        + "\n\nTraining and evaluation losses per step are in `moekit_train_log.json`; TensorBoard logs in `runs/`.",
    ])
    name = config.output.rstrip("/").split("/")[-1] + ("/merged" if kind == "merged" else "")
    return render_card(title=f"{name} (fine-tuned{' adapter' if kind == 'adapter' else ''})", body=body,
                       base_model=base, relation=RELATION[kind] if base else None,
                       tags=["fine-tuned", "sft", "trl", config.method],
                       license=source_license(model_dir),
                       library_name="peft" if kind == "adapter" else "transformers")


def _intro(config, kind: str) -> str:
    what = {"adapter": "A PEFT LoRA adapter", "merged": "A LoRA fine-tune merged into its base weights",
            "full": "A full fine-tune"}[kind]
    return (f"{what} of `{config.model}`, trained with [moekit](https://github.com/moekit/moekit) on TRL's "
            "`SFTTrainer`. " + ("It loads with stock `transformers` (no `trust_remote_code`)."
                                if kind != "adapter" else "Load it on top of the base model with PEFT."))


def _usage(config, kind: str) -> str:
    if kind == "adapter":
        return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f'base = AutoModelForCausalLM.from_pretrained("{config.model}")\n'
                f'model = PeftModel.from_pretrained(base, "{config.output}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{config.output}")')
    folder = config.output.rstrip("/") + ("/merged" if kind == "merged" else "")
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")')


def _loss_on(config, fmt: str) -> str:
    if fmt == "messages":
        return "assistant turns" if config.assistant_only_loss else "every token"
    if fmt in ("prompt_completion", "alpaca"):
        return "completions" if config.completion_only_loss else "every token"
    return "every token"


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.4f}"


def _experts_in(config, info: dict) -> str:
    if not info.get("moe"):
        return ""
    return ("; fused experts packed to NF4, LoRA computed per expert; routers in bf16" if config.quantize_experts
            else "; fused experts and routers in bf16")
