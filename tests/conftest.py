"""Shared fixtures: tiny random LLaMA models built in code, never downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


def make_llama(path, *, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128,
               tie=False, dtype=torch.float32, shard=None, seed=0, model_type="llama"):
    """Save a random LlamaForCausalLM (or Mistral) to ``path``; returns the model in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls_model = (LlamaConfig, LlamaForCausalLM) if model_type == "llama" else (MistralConfig, MistralForCausalLM)
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    cfg = cls_cfg(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    model = cls_model(cfg).to(dtype).eval()
    # LLaMA's init leaves norms at 1 and biases at 0: perturb norms so a wrong copy shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    """(folder, model) of a 2-layer random LLaMA."""
    folder = tmp_path / "dense"
    return folder, make_llama(folder)


@pytest.fixture
def tokens():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def make_tokenizer(path=None):
    """A character-level fast tokenizer over printable ASCII (ids < 128), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in map(chr, range(32, 127)):
        vocab[c] = len(vocab)
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
    )
    if path is not None:
        fast.save_pretrained(path)
    return fast


@pytest.fixture
def tiny_llama_with_tokenizer(tmp_path):
    """(folder, model) of a 2-layer random LLaMA saved with a character tokenizer."""
    folder = tmp_path / "dense"
    model = make_llama(folder)
    make_tokenizer(folder)
    return folder, model
