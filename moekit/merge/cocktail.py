"""LM-Cocktail weights from a few examples: wᵢ = softmax(−Lᵢ/τ).

Lᵢ is model i's mean cross-entropy over the *output* tokens of every example
(prompt tokens are masked). It is token-weighted over all examples, so it does
not depend on the batch size (the reference averages per-batch means). Batches
are right-padded with any id and an explicit attention mask, so tokenizers
without a pad token work (the reference's 0.0.4 fails on them).

Example rows (JSONL):
    {"input": "Translate to French: cat", "output": "chat"}
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

Legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import InputError, MissingDependencyError


@dataclass(frozen=True)
class Encoded:
    """One example: token ids and how many of the first ones are prompt (no loss)."""

    ids: list[int]
    n_prompt: int


def cocktail_weights(losses: list[float], temperature: float = 5.0) -> list[float]:
    """softmax(−L/τ), computed stably in float64.

    Example:
        >>> [round(w, 4) for w in cocktail_weights([1.0, 2.0], temperature=1.0)]
        [0.7311, 0.2689]
    """
    scaled = [-l / temperature for l in losses]
    top = max(scaled)
    exp = [math.exp(s - top) for s in scaled]
    return [e / sum(exp) for e in exp]


def read_examples(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, each ``{"input", "output"}`` or ``{"messages": [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"examples file {path} does not exist — check the --examples path")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e.msg}) — one JSON object per line") from None
        ok = isinstance(row, dict) and (
            (isinstance(row.get("input"), str) and isinstance(row.get("output"), str))
            or (isinstance(row.get("messages"), list) and row["messages"]))
        if not ok:
            raise InputError(f'{path} line {n}: expected {{"input": ..., "output": ...}} or {{"messages": [...]}} — fix the row')
        rows.append(row)
    if not rows:
        raise InputError(f"{path} has no examples — add JSONL rows of input/output pairs")
    return rows


def encode(rows: list[dict], tokenizer, max_length: int) -> list[Encoded]:
    """Token ids of each example; the prompt is cut from the left first when too long.

    ``input``/``output`` pairs are tokenized as LM-Cocktail does: ``input + " " + output``
    followed by EOS, the first ``len(tokenize(input))`` tokens being the prompt. Chat rows
    use the tokenizer's chat template; the last message (the assistant's) is the output.
    """
    out = []
    for n, row in enumerate(rows, 1):
        if "messages" in row:
            prompt, ids = _chat_ids(row["messages"], tokenizer, n)
        else:
            prompt = tokenizer(row["input"])["input_ids"]
            ids = tokenizer(row["input"] + " " + row["output"])["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
        n_prompt = min(len(prompt), len(ids))
        if n_prompt == len(ids):
            raise InputError(f"example {n} has no output tokens — give each example a non-empty output")
        cut = max(0, len(ids) - max_length)
        if cut > n_prompt:  # the output alone is too long: keep its start
            ids, n_prompt = ids[n_prompt:n_prompt + max_length], 0
        else:
            ids, n_prompt = ids[cut:], n_prompt - cut
        out.append(Encoded(ids, n_prompt))
    return out


def _chat_ids(messages: list[dict], tokenizer, n: int) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"example {n} is a chat but the tokenizer has no chat template — use input/output rows "
                         "or --tokenizer-from a model with a template")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise InputError(f"example {n}: the last message must be the assistant's (it is the output scored)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise InputError(f"example {n}: the chat template does not render the prompt as a prefix of the "
                         "conversation — use input/output rows instead")
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the specials
    return enc(prompt), enc(full)


def batches(examples: list[Encoded], batch_size: int, pad_id: int):
    """Yield ``(input_ids_BT, attention_mask_BT, labels_BT)``, right-padded, labels −100 off the output."""
    import torch

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        T = max(len(e.ids) for e in chunk)
        ids_BT = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(chunk), T), dtype=torch.long)
        labels_BT = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, e in enumerate(chunk):
            ids_BT[b, :len(e.ids)] = torch.tensor(e.ids)
            mask_BT[b, :len(e.ids)] = 1
            labels_BT[b, e.n_prompt:len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
        yield ids_BT, mask_BT, labels_BT


def mean_output_loss(model, examples: list[Encoded], batch_size: int, pad_id: int, device) -> float:
    """Mean cross-entropy over every output token of every example."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids_BT, mask_BT, labels_BT in batches(examples, batch_size, pad_id):
            logits_BTV = model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits.float()
            target_BT = labels_BT[:, 1:].to(device)
            total += F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), target_BT.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((target_BT != -100).sum())
    return total / count


def pad_id_of(tokenizer) -> int:
    """Any id works for padding (masked and unlabelled); prefer pad, then EOS."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def load_for_loss(folder: Path, adapter: Path | None, device: str):
    """The model (with its LoRA adapter applied, unmerged) in its stored dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    if adapter is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise MissingDependencyError("computing losses of BASE+ADAPTER models needs peft — "
                                         "pip install 'moekit[train]'") from None
        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval()


def model_losses(inputs, tokenizer, rows: list[dict], max_length: int, batch_size: int, device: str,
                 progress: bool = True) -> list[float]:
    """Lᵢ for each input (objects with ``.folder`` and ``.adapter_folder``), one model in memory at a time."""
    from tqdm.auto import tqdm

    device = _device(device)
    examples = encode(rows, tokenizer, max_length)
    pad_id = pad_id_of(tokenizer)
    losses = []
    for inp in tqdm(inputs, desc="losses", unit="model", disable=not progress):
        model = load_for_loss(inp.folder, inp.adapter_folder, device)
        losses.append(mean_output_loss(model, examples, batch_size, pad_id, device))
        del model
        gc.collect()
    return losses


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
