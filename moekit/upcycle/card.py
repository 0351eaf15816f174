"""The model card of an upcycled checkpoint: what was done, exactly how, and what to expect."""

from __future__ import annotations

from moekit.hub.card import fenced, render_card, source_license, table


def upcycle_card(plan, config, auto: tuple[bool, bool] = (False, False)) -> str:
    """The card; ``config`` has method/router pinned, ``auto`` says whether each was ``auto``."""
    from moekit.upcycle.convert import command_line, describe_scale
    from moekit.config import to_recipe

    lay, spec = plan.layout, plan.spec
    # data-driven routers are zero when every expert is active, so those are exact too
    exact = lay.top_k == lay.num_experts and spec.router != "random" and spec.scale == "auto"
    rows = [
        ("source", f"`{config.source}`"),
        ("architecture", plan.fmt.architecture),
        ("method", spec.method + (" (auto)" if auto[0] else "")),
        ("experts", f"{lay.num_experts} routed x {lay.expert_size} neurons, top-{lay.top_k}"
         + (f", plus an always-on shared expert of {lay.shared_size} neurons" if lay.shared_size else "")),
        ("dense layers", ", ".join(map(str, lay.dense_layers)) or "none"),
        ("router init", spec.router + (" (auto)" if auto[1] else "")),
        ("routing weights", "top-k renormalised" if lay.norm_topk_prob else "softmax probabilities (norm_topk_prob false)"),
        ("expert scale (in down_proj)", describe_scale(plan)),
        ("parameters", f"{plan.total_params / 1e6:,.1f}M total, {plan.active_params / 1e6:,.1f}M active per token"),
        ("seed", config.seed),
    ]
    if plan.calibrator is not None:
        rows.append(("calibration", f"{plan.calibrator.tokens:,} tokens of `{config.calib_data}`, {plan.calib_seconds:.0f}s"))
    recall = {l: s.recall for l, s in sorted(plan.splits.items()) if s.recall is not None}
    if recall and lay.top_k < lay.num_experts:
        rows.append(("router top-k recall vs oracle", f"mean {sum(recall.values()) / len(recall):.2f}, per layer "
                     + " ".join(f"{v:.2f}" for v in recall.values())))
    quality = (
        "With every expert active and a uniform router this checkpoint reproduces the dense model's logits."
        if exact else
        "This model has **not been trained** after upcycling: with only some experts active per token its "
        "quality is below the dense source (far below without calibration). Continue pretraining it "
        "(`moekit pretrain`) before use, and measure it with `moekit eval --compare SRC --expert-stats`."
    )
    local = config.source.startswith(("/", ".", "~"))
    body = "\n\n".join([
        "A Mixture-of-Experts model upcycled from "
        + (f"`{config.source}`" if local else f"[`{config.source}`](https://huggingface.co/{config.source})")
        + " with [moekit](https://github.com/moekit/moekit). "
        "It loads with stock `transformers` (no `trust_remote_code`).",
        table(rows, ("setting", "value")),
        "## Quality\n\n" + quality,
        "## Usage\n\n" + fenced(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{config.output}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{config.output}")', "python"),
        "## Reproduce\n\n" + fenced(command_line(config), "bash") + "\n\nResolved recipe:\n\n"
        + fenced(to_recipe(config, "upcycle"), "yaml")
        + "\n\n`moekit_upcycle.json` lists, per layer, the dense neurons each expert (and the shared "
        "expert) holds, the expert scales and the router recall. Router recall: the fraction of the oracle's "
        "top-k experts (those whose outputs best rebuild the dense FFN output) the router picks, on held-out "
        "calibration tokens.",
    ])
    return render_card(title=f"{config.output.rstrip('/').split('/')[-1]} (upcycled MoE)", body=body,
                       base_model=config.source if not config.source.startswith(("/", ".")) else None,
                       relation=None, tags=["upcycling", "mixture-of-experts", plan.fmt.name],
                       license=source_license(plan.source))
