"""The model card of an upcycled checkpoint: what was done, exactly how, and what to expect."""

from __future__ import annotations

from moekit.hub.card import fenced, render_card, source_license, table


def upcycle_card(plan, config) -> str:
    from moekit.upcycle.convert import command_line, expert_scale
    from moekit.config import to_recipe

    lay = plan.layout
    exact = lay.top_k == lay.num_experts and config.router == "zero"
    rows = [
        ("source", f"`{config.source}`"),
        ("architecture", plan.fmt.architecture),
        ("method", config.method),
        ("experts", f"{lay.num_experts} x {lay.expert_size} neurons, top-{lay.top_k}"),
        ("router init", config.router),
        ("expert scale (in down_proj)", f"{expert_scale(config, lay):g}"),
        ("parameters", f"{plan.total_params / 1e6:,.1f}M total, {plan.active_params / 1e6:,.1f}M active per token"),
        ("seed", config.seed),
    ]
    quality = (
        "With every expert active and a uniform router this checkpoint reproduces the dense model's logits."
        if exact else
        "This model has **not been trained** after upcycling: with only some experts active per token and an "
        "uncalibrated router its quality is far below the dense source. Continue pretraining it "
        "(`moekit pretrain`) before use, and measure it with `moekit eval`."
    )
    body = "\n\n".join([
        f"A Mixture-of-Experts model upcycled from [`{config.source}`]"
        f"(https://huggingface.co/{config.source}) with [moekit](https://github.com/moekit/moekit). "
        "It loads with stock `transformers` (no `trust_remote_code`).",
        table(rows, ("setting", "value")),
        "## Quality\n\n" + quality,
        "## Usage\n\n" + fenced(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{config.output}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{config.output}")', "python"),
        "## Reproduce\n\n" + fenced(command_line(config), "bash") + "\n\nResolved recipe:\n\n"
        + fenced(to_recipe(config, "upcycle"), "yaml")
        + "\n\n`moekit_upcycle.json` lists, per layer, the dense neurons each expert holds.",
    ])
    return render_card(title=f"{config.output.rstrip('/').split('/')[-1]} (upcycled MoE)", body=body,
                       base_model=config.source if not config.source.startswith(("/", ".")) else None,
                       relation=None, tags=["upcycling", "mixture-of-experts", plan.fmt.name],
                       license=source_license(plan.source))
