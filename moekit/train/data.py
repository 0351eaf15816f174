"""Training data: load a source, recognise its format, shape it for TRL's SFTTrainer.

Data flow: ``load_source`` (local text / JSONL / JSON / Parquet / CSV files, a
folder or glob of them, or a Hub dataset) -> ``detect_format`` (from the columns)
-> ``split_heldout`` -> ``to_sft_dataset`` (one of TRL's dataset types).

Formats and what the loss covers by default:
  messages            chat turns; loss on assistant turns only (masked here, for any chat template)
  prompt_completion   loss on the completion only (TRL's ``completion_only_loss``)
  alpaca              instruction / input / output -> prompt / completion
  text                plain text; loss on every token (language modelling)
"""

from __future__ import annotations

import glob as globlib
from pathlib import Path

from moekit.errors import InputError
from moekit.train.log import logger

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".md": "text"}
FORMATS = ("messages", "prompt_completion", "alpaca", "text")
NEEDED = "messages, prompt+completion, instruction+output (Alpaca) or text"
# Zephyr-style turns, used only when the tokenizer has no chat template; saved with the output tokenizer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. "
                 "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input}### Response:\n")


# --- load -----------------------------------------------------------------------------------


def load_source(src: str, *, split: str = "train", subset: str | None = None, revision: str | None = None,
                streaming: bool = False, text_sample_by: str = "paragraph", data_dir: str | None = None):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) from ``src``.

    Args:
        src: a file (``.jsonl .json .parquet .csv .txt .md``), a folder or glob of such files,
            or a Hub dataset id.
        split: split of a Hub dataset (local files are one ``train`` split).
        subset: Hub dataset configuration name.
        data_dir: folder inside a Hub dataset to read (e.g. one domain of a corpus split by folder).
        text_sample_by: for ``.txt`` / ``.md``: ``paragraph`` (blank-line separated), ``line`` or ``document``.

    Example:
        >>> load_source("chat.jsonl").column_names   # doctest: +SKIP
        ['messages']
    """
    import datasets

    files = _local_files(src)
    if files and all(f.stat().st_size == 0 for f in files):  # datasets' own error for this says nothing useful
        raise InputError(f"data {src} is empty — check the file")
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # loading is quick; its bars would only bury a one-line error
        datasets.disable_progress_bars()
    try:
        if files is None:
            ds = datasets.load_dataset(src, subset, split=split, revision=revision, streaming=streaming,
                                       data_dir=data_dir)
        else:
            builder = _builder(src, files)
            kw = {"sample_by": text_sample_by} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       streaming=streaming, **kw)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, connection, arrow, json)
        first = (str(e).splitlines() or [""])[0][:160]
        where = "the file is well-formed" if files else "the dataset name, or pass a local file (offline?)"
        raise InputError(f"cannot load data {src} ({e.__class__.__name__}: {first}) — check {where}") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    if not streaming and len(ds) == 0:
        raise InputError(f"data {src} has no examples — check the file or split")
    return ds


def _local_files(src: str) -> list[Path] | None:
    """The local files ``src`` names, or None when it is a Hub id."""
    path = Path(src).expanduser()
    if any(c in src for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path)) if Path(p).is_file())
        if not files:
            raise InputError(f"no file matches {src} — check the pattern")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise InputError(f"folder {src} holds no {', '.join(BUILDERS)} files — point --data at the data files")
        return files
    if path.suffix in BUILDERS or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise InputError(f"data file {src} does not exist — check the path")
    return None


def _builder(src: str, files: list[Path]) -> str:
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix not in BUILDERS)
        raise InputError(f"{bad} has an unsupported extension — use {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise InputError(f"{src} mixes {', '.join(sorted(kinds))} files — give one kind per source")
    return kinds.pop()


# --- recognise ------------------------------------------------------------------------------


def detect_format(columns: list[str], src: str = "data") -> str:
    """Which of :data:`FORMATS` a dataset with these columns is; an ``InputError`` when none."""
    cols = set(columns)
    if "messages" in cols or "conversations" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise InputError(f"{src} has columns {', '.join(sorted(cols)) or '(none)'} — training needs {NEEDED}; "
                     "rename the columns")


def split_heldout(ds, fraction: float, seed: int):
    """(train, held-out) with ``fraction`` of the examples held out, or (ds, None) when 0."""
    if not fraction:
        return ds, None
    n_eval = int(len(ds) * fraction)
    if n_eval < 1 or n_eval >= len(ds):
        raise InputError(f"eval_fraction={fraction} of {len(ds)} examples holds out {n_eval} — "
                         "change --eval-fraction or use more data")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --- shape for TRL --------------------------------------------------------------------------


def ensure_chat_template(tokenizer) -> bool:
    """Give ``tokenizer`` :data:`DEFAULT_CHAT_TEMPLATE` when it has none; True when it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    logger.info("the tokenizer has no chat template: using a Zephyr-style default (<|role|> turns ending in EOS), "
                "saved with the output tokenizer")
    return True


def to_sft_dataset(ds, fmt: str, tokenizer, *, assistant_only_loss: bool = True, src: str = "data"):
    """``ds`` as one of TRL's SFT dataset types.

    ``messages`` with ``assistant_only_loss`` become pre-tokenised ``input_ids`` / ``labels``
    (-100 outside assistant turns); the other formats stay text for TRL to tokenise.
    """
    cols = ds.column_names
    if fmt == "messages":
        if "messages" not in cols:  # ShareGPT {"from", "value"} turns
            ds = ds.map(lambda ex: {"messages": sharegpt_to_messages(ex["conversations"])}, remove_columns=cols)
        _check_messages(ds[0]["messages"], src)
        ensure_chat_template(tokenizer)
        if not assistant_only_loss:
            return ds.select_columns(["messages"])
        return ds.map(lambda ex: chat_labels(tokenizer, ex["messages"]), remove_columns=ds.column_names,
                      desc="Masking non-assistant tokens")
    if fmt == "prompt_completion":
        if not isinstance(ds[0]["prompt"], str):
            ensure_chat_template(tokenizer)
        return ds.select_columns(["prompt", "completion"])
    if fmt == "alpaca":
        chat = bool(getattr(tokenizer, "chat_template", None))
        return ds.map(lambda ex: alpaca_to_prompt_completion(ex, chat), remove_columns=cols)
    if fmt == "text":
        return ds.select_columns(["text"])
    raise ValueError(f"unknown data format {fmt!r}")


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def sharegpt_to_messages(turns: list[dict]) -> list[dict]:
    """ShareGPT ``{"from": "human"|"gpt"|"system", "value": ...}`` turns as ``{"role", "content"}`` messages."""
    return [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in turns]


def _check_messages(messages, src: str) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    if not ok:
        raise InputError(f"{src}: `messages` must be a list of {{role, content}} turns, got {str(messages)[:80]!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{src}: the first conversation has no assistant turn — nothing to learn from")


def alpaca_to_prompt_completion(example: dict, chat: bool) -> dict:
    """Alpaca instruction/input/output -> prompt/completion: chat turns when the tokenizer has a
    chat template, else the original Alpaca prompt text."""
    instruction, context, output = example["instruction"], example.get("input") or "", example["output"]
    if chat:
        user = instruction + (f"\n\n{context}" if context else "")
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": output}]}
    prompt = ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if context else "",
        instruction=instruction, input=f"### Input:\n{context}\n\n" if context else "")
    return {"prompt": prompt, "completion": output}


def chat_labels(tokenizer, messages: list[dict]) -> dict:
    """Token ids of the rendered chat and labels that are -100 outside assistant turns.

    Each assistant turn spans the characters between the conversation rendered up to it
    (with the generation prompt) and rendered through it; tokens starting inside a span
    are trained. Works with any chat template that renders conversations prefix-first.
    """
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = (render(messages[:i], True) if i else ""), render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise InputError("the chat template does not render conversations prefix-first, so assistant turns "
                             "cannot be located — set assistant_only_loss: false, or give prompt/completion data")
        spans.append((len(before), len(through)))
    ids, starts = _tokenize_with_starts(tokenizer, text, spans)
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, a in zip(ids, starts)]
    return {"input_ids": ids, "labels": labels}


def _tokenize_with_starts(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and each token's start character."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        pass  # tokenizers without offsets: tokenise span by span (boundaries are turn edges)
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids, starts = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        starts += [a] * len(piece)
    return ids, starts
