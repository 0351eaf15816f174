"""Pretraining data: sources -> documents -> token blocks (cached) -> one weighted mixture.

Data flow per source: ``load_source`` -> check the text column -> hold out documents
(``eval_fraction``) -> tokenise and pack into ``max_length`` blocks in one batched
``Dataset.map`` whose result is cached next to the source's Arrow files under a
fingerprint of (source, split, tokenizer, settings): a second run with the same
inputs reads the blocks back instead of tokenising again. Then the sources' blocks
are interleaved with the mixture weights (``datasets.interleave_datasets``, seeded).

Documents end with EOS (and start with BOS when the tokenizer adds one); ``.txt`` /
``.md`` files are read by paragraph and joined by blank lines, as the text they were.
Every block holds exactly ``max_length`` tokens, so a step's token count is
``max_length x batch x accumulation x processes`` and mixture weights are token weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from moekit.errors import InputError
from moekit.pretrain.config import PretrainConfig, Source, parse_source
from moekit.train import data as D
from moekit.train.log import logger

CACHE_VERSION = "moekit-pretrain-blocks-1"  # bump when the block layout changes
DOCS_PER_MAP_BATCH = 2000  # each batch's tail (< one block) is dropped, as in transformers' run_clm
QUIET_BELOW = 50_000  # documents: tokenising fewer is quick, and a bar would only bury a one-line error
STREAM_SHUFFLE_BUFFER = 1000
BUILTIN = "builtin"


@dataclass
class SourceInfo:
    name: str
    weight: float
    documents: int | None = None  # None when streaming
    blocks: int | None = None
    cached: bool = False  # the blocks were read from the cache, not tokenised


@dataclass
class PretrainData:
    """Packed blocks (``input_ids`` of ``max_length`` tokens) ready for the trainer."""

    train: object  # datasets.Dataset, or IterableDataset when streaming
    eval: object | None
    sources: list[SourceInfo] = field(default_factory=list)
    eval_blocks: int = 0


# --- tokenise and pack ----------------------------------------------------------------------


def tokenizer_key(tokenizer) -> str:
    """A digest of everything that decides token ids: vocabulary, merges, normalisation, special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is what they have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer("a")["input_ids"]]).encode())
    return h.hexdigest()[:16]


def pack_batch(batch: dict, *, tokenizer, text_field: str, block: int, paragraphs: bool) -> dict:
    """One ``map`` batch of documents -> as many full ``block``-token sequences as they fill."""
    texts = [t for t in batch[text_field] if isinstance(t, str) and t.strip()]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    if paragraphs:  # pieces of one running text: give back the blank lines the reader split on
        for ids in tokenizer([t + "\n\n" for t in texts], add_special_tokens=False, verbose=False)["input_ids"]:
            stream += ids
    else:
        for ids in tokenizer(texts, verbose=False)["input_ids"]:
            stream += ids
            if eos is not None and (not ids or ids[-1] != eos):
                stream.append(eos)
    return {"input_ids": [stream[i: i + block] for i in range(0, len(stream) - block + 1, block)]}


def to_blocks(ds, tokenizer, *, text_field: str, block: int, name: str, paragraphs: bool):
    """(blocks, cached): ``ds`` tokenised and packed, read back from the cache when this exact
    (data, tokenizer, settings) was done before. Streaming datasets are packed lazily."""
    kwargs = dict(batched=True, batch_size=DOCS_PER_MAP_BATCH, remove_columns=[text_field],
                  fn_kwargs=dict(tokenizer=tokenizer, text_field=text_field, block=block, paragraphs=paragraphs))
    if not hasattr(ds, "_fingerprint"):  # IterableDataset
        return ds.map(pack_batch, **kwargs), False
    key = hashlib.sha256(json.dumps([CACHE_VERSION, ds._fingerprint, tokenizer_key(tokenizer), text_field, block,
                                     paragraphs]).encode()).hexdigest()[:16]
    cache = None
    if ds.cache_files:  # in-memory datasets cannot be cached
        cache = os.path.join(os.path.dirname(ds.cache_files[0]["filename"]), f"moekit-blocks-{key}.arrow")
    cached = cache is not None and os.path.exists(cache)
    import datasets

    quiet = len(ds) < QUIET_BELOW and not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        out = ds.map(pack_batch, new_fingerprint=key, cache_file_name=cache, load_from_cache_file=True,
                     desc=f"Tokenising {name}", **kwargs)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return out, cached


# --- sources --------------------------------------------------------------------------------


def load_documents(source: Source, *, streaming: bool):
    """The source's documents (a ``text_field`` column), checked non-empty.

    ``builtin`` is Python's reference documentation (``builtin`` / ``builtin:calib``: three
    quarters of the topics, ``builtin:eval``: the rest), offline in every Python install.
    """
    if source.path == BUILTIN:
        import datasets

        from moekit.text import builtin_texts

        if source.subset not in (None, "calib", "eval"):
            raise InputError(f"data {source.name}: builtin text has parts calib and eval — use builtin:calib or builtin:eval")
        return datasets.Dataset.from_dict({source.text_field: builtin_texts(source.subset or "calib")})
    ds = D.load_source(source.path, split=source.split, subset=source.subset, streaming=streaming,
                       data_dir=source.data_dir)
    columns = ds.column_names
    if columns is None:  # streaming without known features: look at the first row
        first = next(iter(ds), None)
        if first is None:
            raise InputError(f"data {source.name} has no examples — check the file or split")
        columns = list(first)
    if source.text_field not in columns:
        raise InputError(f"data {source.name} has columns {', '.join(columns) or '(none)'} and no "
                         f"{source.text_field!r} — rename the column or give text_field in the source mapping")
    return ds.select_columns([source.text_field])


def _is_paragraphs(ds) -> bool:
    return getattr(getattr(ds, "info", None), "builder_name", None) == "text"


def source_blocks(source: Source, tokenizer, config: PretrainConfig, *, holdout: bool):
    """(train blocks, held-out blocks or None, SourceInfo) for one training source."""
    docs = load_documents(source, streaming=config.streaming)
    paragraphs = _is_paragraphs(docs)
    train_docs, held_docs = docs, None
    if holdout and config.eval_fraction:
        train_docs, held_docs = D.split_heldout(docs, config.eval_fraction, config.seed)
    pack = dict(text_field=source.text_field, block=config.max_length, paragraphs=paragraphs)
    train, cached = to_blocks(train_docs, tokenizer, name=source.name, **pack)
    held = to_blocks(held_docs, tokenizer, name=f"{source.name} (held out)", **pack)[0] if held_docs is not None else None
    info = SourceInfo(source.name, 0.0, cached=cached)
    if not config.streaming:
        info.documents, info.blocks = len(train_docs), len(train)
        if len(train) == 0:
            raise InputError(f"data {source.name} holds fewer than max_length={config.max_length} tokens — "
                             "give more text or lower --max-length")
    return train, held, info


def _first(blocks, n: int | None):
    """The first ``n`` blocks (all when None) as a map-style dataset; streamed ones are read now."""
    if hasattr(blocks, "_fingerprint"):
        return blocks if n is None else blocks.select(range(min(n, len(blocks))))
    import datasets

    rows = list(blocks.take(n))
    return datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]})


# --- mixture --------------------------------------------------------------------------------


def mix(parts: list, weights: list[float], *, seed: int, stopping: str):
    """Interleave block datasets, each block drawn from source i with probability weights[i]."""
    if len(parts) == 1:
        return parts[0]
    import datasets

    total = sum(weights)
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                        stopping_strategy=stopping)


def prepare_data(config: PretrainConfig, tokenizer) -> PretrainData:
    """Every source loaded, tokenised (or read from the cache), packed and mixed; held-out blocks apart.

    Example:
        >>> data = prepare_data(PretrainConfig("moe", "out", data=["a.txt", "b.jsonl"], weights=[3, 1]), tok)  # doctest: +SKIP
        >>> data.train[0]["input_ids"][:4]  # doctest: +SKIP
        [1, 415, 2936, 9060]
    """
    import datasets

    from moekit.train.launch import process_state

    sources = [parse_source(s, "data") for s in config.data]
    weights = config.weights or [1.0] * len(sources)
    with process_state().local_main_process_first():  # one process per machine tokenises, the others read its cache
        parts, held, infos = [], [], []
        for source, weight in zip(sources, weights):
            train, heldout, info = source_blocks(source, tokenizer, config, holdout=not config.eval_data)
            info.weight = weight / sum(weights)
            parts.append(train)
            infos.append(info)
            if heldout is not None:
                held.append(heldout)
        for spec in config.eval_data or []:
            source = parse_source(spec, "eval_data")
            docs = load_documents(source, streaming=config.streaming)
            held.append(to_blocks(docs, tokenizer, text_field=source.text_field, block=config.max_length,
                                  name=f"{source.name} (held out)", paragraphs=_is_paragraphs(docs))[0])
    train = mix(parts, weights, seed=config.seed, stopping=config.mixture_stopping)
    if config.streaming:
        train = train.shuffle(seed=config.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    eval_ds = None
    if held:  # every held-out source contributes its share of eval_tokens
        cap = max(1, config.eval_tokens // config.max_length // len(held)) if config.eval_tokens else None
        eval_ds = datasets.concatenate_datasets([_first(h, cap) for h in held])
        if len(eval_ds) == 0:
            raise InputError(f"the held-out data holds fewer than max_length={config.max_length} tokens — "
                             "raise --eval-fraction, give more --eval-data or lower --max-length")
    for info in infos:
        how = "streamed" if config.streaming else (
            f"{info.documents:,} documents -> {info.blocks:,} blocks" + (" (cached)" if info.cached else ""))
        logger.info(f"data: {info.name} weight {info.weight:.3f}: {how}")
    if eval_ds is not None:
        logger.info(f"held out: {len(eval_ds):,} blocks of {config.max_length} tokens")
    return PretrainData(train, eval_ds, infos, len(eval_ds) if eval_ds is not None else 0)
