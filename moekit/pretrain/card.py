"""The model card of a continued-pretraining output: data, tokens seen, losses, final evaluation."""

from __future__ import annotations

from moekit.finetune.card import hub_id
from moekit.hub.card import fenced, render_card, source_license, table


def pretrain_card(config, *, info: dict, recipe: str, model_dir) -> str:
    """README.md for a ``moekit pretrain`` output.

    ``info`` holds ``tokens``, ``tokens_per_step``, ``trainable`` ({group: count}), ``total_params``,
    ``moe``, ``sources`` (``SourceInfo``), ``eval_blocks``, ``final_eval`` and the loss summary.
    """
    base = hub_id(config.model)
    ev = info.get("final_eval") or {}
    rows = [
        ("base model", f"`{config.model}`"),
        ("data", "<br>".join(f"`{s.name}` × {s.weight:.3f}" for s in info["sources"])),
        ("tokens seen", f"{info['tokens']:,} ({info.get('steps', 0):,} steps × {info['tokens_per_step']:,} tokens, "
                        f"sequences of {config.max_length})"),
        ("trained", ", ".join(config.train) + f" ({sum(info['trainable'].values()):,} of {info['total_params']:,} "
                                              "parameters)"),
        ("learning rate", f"{config.learning_rate:g}, {config.lr_scheduler_type}"),
        ("training loss", _fmt(info.get("first_loss")) + " → " + _fmt(info.get("last_loss"))),
    ]
    if info["moe"]:
        rows.append(("router losses", f"load balancing × {config.router_aux_loss_coef:g}, z-loss × {config.z_loss_coef:g}"
                     + (f"; routers alone for the first {config.router_warmup_steps} steps"
                        if config.router_warmup_steps else "")))
    if config.teacher:
        rows.append(("distillation", f"from `{config.teacher}`, weight {config.distill_weight:g}, "
                                     f"temperature {config.distill_temperature:g}"))
    if ev:
        start = f" (from {ev['start_perplexity']:.3f} before training)" if "start_perplexity" in ev else ""
        rows.append(("held-out perplexity", f"{ev['perplexity']:.3f}{start} on {info['eval_blocks']:,} blocks"))
        if "router_entropy" in ev:
            balance = f"max/min {ev['expert_load_max_min']:.2f} (worst layer), " if "expert_load_max_min" in ev else ""
            rows.append(("expert load (held out)", f"{balance}{ev['idle_experts']} idle experts, routing entropy "
                                                   f"{ev['router_entropy']:.3f} nats ({ev['router_entropy_norm']:.3f} "
                                                   "of uniform)"))
    body = "\n\n".join([
        f"`{config.model}` after continued pretraining with [moekit](https://github.com/moekit/moekit) on TRL's "
        "`SFTTrainer`. It is a stock checkpoint of the same architecture: it loads with `transformers` "
        "(no `trust_remote_code`).",
        table(rows, ("setting", "value")),
        "## Usage\n\n" + fenced("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                                f'model = AutoModelForCausalLM.from_pretrained("{config.output}")\n'
                                f'tokenizer = AutoTokenizer.from_pretrained("{config.output}")', "python"),
        "## Reproduce\n\n" + fenced("moekit pretrain --config moekit_recipe.yaml", "bash")
        + "\n\nResolved recipe (`moekit_recipe.yaml`):\n\n" + fenced(recipe, "yaml")
        + "\n\nLosses, held-out perplexity and expert-load figures per step are in `moekit_train_log.json` "
          "(per-layer load in `moekit_expert_load.json`); TensorBoard logs in `runs/`.",
    ])
    tags = ["continued-pretraining", "trl"] + (["upcycling"] if info["moe"] else [])
    name = config.output.rstrip("/").split("/")[-1]
    return render_card(title=f"{name} (continued pretraining)", body=body, base_model=base,
                       relation="finetune" if base else None, tags=tags, license=source_license(model_dir))


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.4f}"
