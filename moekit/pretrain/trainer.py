"""The loss terms and measurements pretraining adds to TRL's ``SFTTrainer``, nothing else.

``PretrainTrainer`` is passed as ``trainer_cls`` to :func:`moekit.train.trainer.build_trainer`;
the loop, checkpoints, resume and logging stay TRL's / transformers'. It adds:

- router z-loss (ST-MoE): ``z_loss_coef * mean(logsumexp(router_logits)^2)`` over every token of
  every MoE layer, from the routers' own outputs (the tensor transformers records as
  ``outputs.router_logits``), so TRL's memory-saving fused LM head stays in use;
- distillation from a dense teacher: ``(1 - w) * LM + w * T^2 * KL(teacher_T || student_T)`` per
  token; the teacher runs in eval mode under ``no_grad``;
- held-out evaluation without the extra terms: ``eval_loss`` is the language-modelling loss, so
  ``eval_perplexity = exp(eval_loss)``, plus the expert-load statistics of ``moekit eval``
  (:class:`moekit.eval.experts.ExpertStats`) gathered during the same forward passes and a
  per-layer JSON record;
- ``tokens`` and ``tokens_per_second`` in every training log (and on the progress bar).

``RouterWarmup`` trains only the routers for the first N steps.

Legend: T tokens, E experts, V vocabulary, N scored tokens, L MoE layers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

from moekit.train.log import logger

EXPERT_LOAD_FILE = "moekit_expert_load.json"


@dataclass
class LossSettings:
    z_loss_coef: float = 0.0
    teacher: object = None  # a causal LM with the student's tokenizer, or None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0


# --- losses ---------------------------------------------------------------------------------


def router_z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over all tokens of all layers of logsumexp(logits_TE)^2."""
    lse_T = torch.cat([torch.logsumexp(x.float(), dim=-1) for x in logits])
    return (lse_T ** 2).mean()


def distill_kl(student_NV: torch.Tensor, teacher_NV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of KL(p_teacher || p_student), both softened by ``temperature``."""
    s = F.log_softmax(student_NV.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_NV.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


# --- router outputs -------------------------------------------------------------------------


def router_modules(model) -> list[torch.nn.Module]:
    """The router of every MoE layer, in order: the module class transformers records
    ``router_logits`` from (``*TopKRouter``; its output 0 is the logits [T, E])."""
    classes = set()
    for m in model.modules():
        recorder = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            classes.add(getattr(recorder, "target_class", recorder))
    classes = tuple(c for c in classes if isinstance(c, type))
    return [m for m in model.modules() if classes and isinstance(m, classes)]


class RouterTap:
    """Forward hooks on the routers that keep their logits while ``recording`` (the z-loss needs
    them). Off otherwise, e.g. while activations are recomputed in the backward pass."""

    def __init__(self, model):
        self.modules = router_modules(model)
        self.recording, self.logits = False, []
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def _hook(self, module, args, output):
        if self.recording:
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        logits, self.logits, self.recording = self.logits, [], False
        return logits


def load_report(stats, accelerator) -> dict:
    """``stats.report()`` over every process's evaluation tokens (their counts are summed first)."""
    if accelerator.num_processes > 1:
        for layer in stats.layers.values():
            sums = torch.tensor([layer.entropy_sum, layer.tokens], dtype=torch.float64, device=accelerator.device)
            layer.counts_E = accelerator.reduce(layer.counts_E.to(accelerator.device), "sum").cpu()
            layer.entropy_sum, tokens = accelerator.reduce(sums, "sum").tolist()
            layer.tokens = int(tokens)
    return stats.report()


def load_scalars(report: dict) -> dict:
    """The figures logged per evaluation: the worst layer's balance, idle experts, mean routing entropy."""
    layers = list(report["layers"].values())
    ratios = [v["max_min_load_ratio"] for v in layers if v["max_min_load_ratio"] is not None]
    out = {"expert_load_max_frac": max(max(v["load"]) for v in layers),  # 1/E when balanced
           "idle_experts": sum(v["idle_experts"] for v in layers),
           "router_entropy": sum(v["routing_entropy"] for v in layers) / len(layers),  # nats
           "router_entropy_norm": report["mean_routing_entropy_norm"]}  # 1.0 = uniform router
    if ratios:
        out["expert_load_max_min"] = max(ratios)  # layers with an idle expert are counted in idle_experts
    return out


# --- the trainer ----------------------------------------------------------------------------


class PretrainTrainer(SFTTrainer):
    """``SFTTrainer`` + z-loss, distillation, clean held-out perplexity, expert load, tokens/s.

    Built with ``functools.partial(PretrainTrainer, losses=..., tokens_per_step=..., run=...)``.
    """

    def __init__(self, *args, losses: LossSettings, tokens_per_step: int, run: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses, self.tokens_per_step, self.run = losses, tokens_per_step, run
        self.tap = RouterTap(self.model)
        self.expert_stats = None  # moekit.eval.experts.ExpertStats while evaluating an MoE
        self.teacher = losses.teacher
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self._mark = (time.perf_counter(), 0)

    # -- loss --

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training
        z_coef = self.losses.z_loss_coef if training and self.tap.modules else 0.0
        self.tap.recording = bool(z_coef)
        try:
            if training and self.teacher is not None:
                loss = self._distilled_loss(model, inputs, num_items_in_batch)
            else:
                loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
        finally:
            logits = self.tap.take()
        if z_coef:
            z = router_z_loss(logits)
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            extra = z_coef * z / steps
            loss = (loss[0] + extra, *loss[1:]) if isinstance(loss, tuple) else loss + extra
            self._metrics["train"]["z_loss"].append(self.accelerator.gather_for_metrics(z.detach()).mean().item())
        return loss

    def _distilled_loss(self, model, inputs, num_items_in_batch):
        """(1 - w) * LM + w * T^2 * KL, both summed over scored tokens and normalised like TRL's LM loss."""
        s = self.losses
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["use_cache"] = False
        if self.aux_loss_enabled:
            forward["output_router_logits"] = True
        outputs = model(**forward)  # the model's own forward: full logits
        mask = labels[:, 1:] != -100
        student_NV = outputs.logits[:, :-1][mask]
        if next(self.teacher.parameters()).device != student_NV.device:
            self.teacher.to(student_NV.device)
        with torch.no_grad():
            teacher_out = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                       use_cache=False)
            teacher_NV = teacher_out.logits[:, :-1][mask]
        nll = F.cross_entropy(student_NV.float(), labels[:, 1:][mask], reduction="sum")
        kl = distill_kl(student_NV, teacher_NV, s.distill_temperature)
        n = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else mask.sum()).clamp(min=1)
        loss = ((1 - s.distill_weight) * nll + s.distill_weight * s.distill_temperature ** 2 * kl) / n
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, n counts every rank's tokens
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics["train"]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        count = mask.sum().clamp(min=1)
        gather = lambda t: self.accelerator.gather_for_metrics(t.detach()).mean().item()
        self._metrics["train"]["lm_loss"].append(gather(nll / count))
        self._metrics["train"]["distill_kl"].append(gather(kl / count))
        return loss

    # -- evaluation: LM loss only, expert load from the same passes --

    def evaluate(self, *args, **kwargs):
        text_config = self.model.config.get_text_config()
        saved = (self.aux_loss_enabled, getattr(text_config, "output_router_logits", None))
        self.aux_loss_enabled = False  # eval_loss = the language-modelling loss alone
        if saved[1] is not None:
            text_config.output_router_logits = False
        if self.tap.modules:  # expert load as `moekit eval` measures it, during the same forward passes
            from moekit.eval.experts import ExpertStats

            self.expert_stats = ExpertStats(self.accelerator.unwrap_model(self.model), oracle_tokens=0)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.aux_loss_enabled = saved[0]
            if saved[1] is not None:
                text_config.output_router_logits = saved[1]
            if self.expert_stats is not None:
                self.expert_stats.close()
                self.expert_stats = None
            self._mark = (time.perf_counter(), self.state.global_step)  # tokens/s leaves evaluation out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            if self.expert_stats:
                report = load_report(self.expert_stats, self.accelerator)
                logs.update({f"eval_{k}": v for k, v in load_scalars(report).items()})
                self._record_load(report, logs)
        elif "loss" in logs:
            step, now = self.state.global_step, time.perf_counter()
            t0, s0 = self._mark
            logs["tokens"] = step * self.tokens_per_step
            if step > s0 and now > t0:
                logs["tokens_per_second"] = round((step - s0) * self.tokens_per_step / (now - t0), 1)
                self._show_speed(logs["tokens_per_second"])
            self._mark = (now, step)
        super().log(logs, start_time)

    def _record_load(self, report: dict, logs: dict) -> None:
        """Append this evaluation's per-layer load to ``run/moekit_expert_load.json`` (kept across --resume)."""
        if self.run is None or not self.is_world_process_zero():
            return
        entry = {"step": self.state.global_step, "tokens": self.state.global_step * self.tokens_per_step,
                 "eval_perplexity": logs["eval_perplexity"], "layers": report["layers"]}
        path = Path(self.run) / EXPERT_LOAD_FILE
        history = json.loads(path.read_text()) if path.is_file() else []
        history = [h for h in history if h["step"] < self.state.global_step] + [entry]
        path.write_text(json.dumps(history, indent=1))

    def _show_speed(self, tokens_per_second: float) -> None:
        from transformers.trainer_callback import ProgressCallback

        for cb in self.callback_handler.callbacks:
            bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
            if bar is not None:
                bar.set_postfix_str(f"{tokens_per_second:,.0f} tok/s", refresh=False)


# --- router-only warm-up --------------------------------------------------------------------


class RouterWarmup(TrainerCallback):
    """Only the routers learn during the first ``steps`` optimizer steps; then every parameter
    that was trainable learns again. The optimizer holds all of them from the start (a frozen
    parameter has no gradient, so AdamW skips it), and a resumed run freezes again if needed."""

    def __init__(self, steps: int):
        self.steps, self.frozen = steps, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.steps:
            return
        routers = {id(p) for m in router_modules(model) for p in m.parameters()}
        self.frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in routers]
        for p in self.frozen:
            p.requires_grad_(False)
        logger.info(f"router warm-up: only the routers train until step {self.steps}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.frozen and state.global_step >= self.steps:
            for p in self.frozen:
                p.requires_grad_(True)
            self.frozen = []
            logger.info(f"router warm-up done at step {state.global_step}: training every selected part")
