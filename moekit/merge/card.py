"""The model card of a merged checkpoint: inputs, weights (and losses), the exact command."""

from __future__ import annotations

import re

from moekit.hub.card import fenced, render_card, source_license, table

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_ids(plan) -> list[str]:
    """Inputs named by Hub repo id (BASE and ADAPTER of BASE+ADAPTER both count); local paths are left out."""
    from moekit.merge.streaming import split_spec

    ids = []
    for inp in plan.inputs:
        for part in split_spec(inp.spec):
            if part and HUB_ID.match(part) and not part.startswith((".", "/", "~")) and part not in ids:
                ids.append(part)
    return ids


def merge_card(plan) -> str:
    from moekit.config import to_recipe
    from moekit.merge.streaming import command_line

    cfg = plan.config
    base = cfg.base is not None
    losses = ([None] if base else []) + (plan.losses or [None] * len(cfg.models))
    rows = [(f"`{i.spec}`", "target" if base and k == 0 else "model", "" if l is None else f"{l:.4f}", f"{w:.6g}")
            for k, (i, l, w) in enumerate(zip(plan.inputs, losses, plan.weights))]
    if base:
        formula = f"M = {cfg.target_share:g}·M_target + {1 - cfg.target_share:g}·Σ wᵢ·Mᵢ"
    else:
        formula = "M = Σ wᵢ·Mᵢ"
    how = (f"Weights from {cfg.examples and cfg.examples.split('/')[-1]!s} examples: wᵢ = softmax(−Lᵢ/τ), "
           f"τ = {cfg.temperature:g}, Lᵢ the model's mean loss on the examples' output tokens."
           if plan.losses is not None else "Weights given explicitly.")
    body = "\n\n".join([
        f"A merge of {len(plan.inputs)} models with [LM-Cocktail](https://arxiv.org/abs/2311.13534) "
        f"({cfg.method}: {formula}, every tensor in float32), made with [moekit](https://github.com/moekit/moekit).",
        table(rows, ("model", "role", "loss", "weight")),
        how,
        "## Usage\n\n" + fenced(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{cfg.push_to_hub or cfg.output}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{cfg.push_to_hub or cfg.output}")', "python"),
        "## Reproduce\n\n" + fenced(command_line(cfg), "bash") + "\n\nResolved recipe:\n\n"
        + fenced(to_recipe(cfg, "merge"), "yaml"),
    ])
    tags = ["merge", "lm-cocktail"] + (["lora"] if any(i.lora for i in plan.inputs) else [])
    ids = hub_ids(plan)
    return render_card(title=f"{str(cfg.output).rstrip('/').split('/')[-1]} (merge)", body=body,
                       base_model=ids or None, relation="merge" if ids else None, tags=tags,
                       license=source_license(plan.inputs[0].folder))
