"""moekit pretrain: learning, resume, MoE losses, distillation, what trains, data mixture and cache,
outputs, errors (CPU, tiny models)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import make_llama, make_tokenizer  # noqa: E402

from moekit.cli.main import main  # noqa: E402
from moekit.errors import ConfigError  # noqa: E402
from moekit.pretrain import PretrainConfig, pretrain  # noqa: E402
from moekit.train.options import run_dir  # noqa: E402

WORDS = ["cat", "dog", "sun", "red", "big", "low", "sky", "hat"]
SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP threads spin against each other (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """dense: a tiny LLaMA; moe: it upcycled to Mixtral 4 experts top-2 (random split and router);
    other_tok: the dense model with a tokenizer that numbers characters differently."""
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("models")
    make_llama(root / "dense")
    make_tokenizer(root / "dense")
    upcycle(UpcycleConfig(str(root / "dense"), str(root / "moe"), num_experts=4, top_k=2, format="mixtral",
                          method="random", router="random"), progress=False)
    make_tokenizer(root / "moe")
    make_llama(root / "other_tok")
    tok = json.loads((make_tokenizer(root / "other_tok"), (root / "other_tok" / "tokenizer.json").read_text())[1])
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (root / "other_tok" / "tokenizer.json").write_text(json.dumps(tok))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text("\n\n".join(f"the {w} is {w} and the {w} stays {w}." for w in WORDS * 40))
    (root / "heldout.txt").write_text("\n\n".join(f"a {w} sees the {w} and the {w}." for w in WORDS * 6))
    (root / "a.jsonl").write_text("".join(json.dumps({"text": "a" * 40}) + "\n" for _ in range(200)))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": "b" * 40}) + "\n" for _ in range(200)))
    (root / "empty.txt").write_text("")
    (root / "tiny.txt").write_text("too short")
    (root / "bad.jsonl").write_text(json.dumps({"content": "no text column"}) + "\n")
    return root


def fast(model, output, data, **kw) -> PretrainConfig:
    """A PretrainConfig for a few CPU steps."""
    defaults = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3,
                    warmup_steps=0, logging_steps=1, save_steps=100, max_length=SEQ, report_to=["none"],
                    experts_implementation="batched_mm", gradient_checkpointing=False)
    return PretrainConfig(str(model), str(output), data=data if isinstance(data, list) else [str(data)],
                          **{**defaults, **kw})


class Batches:
    """A callback recording the training batches (input_ids) the model sees, in order."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Batches(TrainerCallback):
            def __init__(self):
                self.seen = []

            def on_train_begin(self, args, state, control, model=None, **kw):
                def grab(module, a, kwargs):
                    if module.training:
                        self.seen.append(kwargs["input_ids"].clone())

                model.register_forward_pre_hook(grab, with_kwargs=True)

        return _Batches()


def state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def losses(result, key="loss"):
    return [e[key] for e in result.trainer.state.log_history if key in e]


# --- a whole run: learning, outputs, evaluation ----------------------------------------------


def test_cli_run_learns_and_writes_a_stock_checkpoint(models, data, tmp_path, capsys):
    """Loss and held-out perplexity fall; the output is a stock Mixtral with card, recipe, logs, expert load."""
    from transformers import AutoModelForCausalLM

    from moekit.config import build_config
    from moekit.hub.push import check_card

    out = tmp_path / "cpt"
    rc = main(["pretrain", str(models / "moe"), str(out), "--data", str(data / "text.txt"), "--max-steps", "24",
               "--max-length", str(SEQ), "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
               "--learning-rate", "3e-3", "--warmup-steps", "0", "--eval-fraction", "0.1", "--eval-steps", "12",
               "--logging-steps", "4", "--save-steps", "100", "--aux-loss-coef", "0.01",
               "--experts-implementation", "batched_mm", "--no-gradient-checkpointing"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"wrote {out} (3,072 tokens, held-out perplexity" in captured.out
    assert "tok/s" in captured.err and "experts: batched_mm on CPU" in captured.err

    log = json.loads((out / "moekit_train_log.json").read_text())
    train = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval_loss" in e]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert [e["step"] for e in evals] == [0, 12, 24]  # eval_on_start: the curve starts untrained
    assert evals[-1]["eval_perplexity"] < 0.5 * evals[0]["eval_perplexity"]
    assert all(e["tokens"] == e["step"] * 4 * SEQ and e["tokens_per_second"] > 0 for e in train)
    assert math.isclose(evals[-1]["eval_perplexity"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-6)
    assert 0 < evals[-1]["eval_router_entropy"] <= math.log(4) and 0.25 <= evals[-1]["eval_expert_load_max_frac"] <= 1
    load = json.loads((out / "moekit_expert_load.json").read_text())  # per layer, as `moekit eval` reports it
    assert [h["step"] for h in load] == [0, 12, 24] and list(load[-1]["layers"]) == ["0", "1"]
    for layer in load[-1]["layers"].values():
        assert math.isclose(sum(layer["load"]), 1.0, abs_tol=1e-4)
        assert f"on {layer['tokens'] // SEQ} blocks" in (out / "README.md").read_text()  # every held-out token

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.output_router_logits is False
    meta = check_card(out / "README.md")
    assert {"continued-pretraining", "upcycling"} <= set(meta["tags"])
    card = (out / "README.md").read_text()
    assert "3,072 (24 steps × 128 tokens" in card and "held-out perplexity" in card
    recipe = build_config(PretrainConfig, out / "moekit_recipe.yaml", "pretrain")
    assert recipe.router_aux_loss_coef == 0.01 and recipe.max_steps == 24 and recipe.resume_from_checkpoint is False
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert not run_dir(out).exists() and not (out / "training_args.bin").exists()


def test_eval_perplexity_is_moekit_eval_perplexity(models, data, tmp_path):
    """The trainer's held-out perplexity equals moekit.eval's on the same blocks (disjoint windows)."""
    from moekit.eval.perplexity import perplexity

    res = pretrain(fast(models / "moe", tmp_path / "o", data / "text.txt", max_steps=2, eval_fraction=0.1,
                        eval_steps=2, eval_tokens=8 * SEQ), progress=False)
    blocks = res.trainer.eval_dataset["input_ids"]
    assert len(blocks) == 8
    ids = torch.tensor([t for b in blocks for t in b])
    ours = perplexity(res.trainer.model.eval(), ids, seq_len=SEQ, batch_size=4, progress=False)["perplexity"]
    assert math.isclose(res.metrics["perplexity"], ours, rel_tol=1e-4)


# --- resume ----------------------------------------------------------------------------------


def test_resume_continues_with_the_same_data_and_weights(models, data, tmp_path):
    """A crash after checkpoint-4 then --resume: same final step, same batches, same weights as one run."""
    from transformers import TrainerCallback

    whole = Batches()
    pretrain(fast(models / "moe", tmp_path / "ref", data / "text.txt", max_steps=6, save_steps=2),
                   progress=False, callbacks=[whole])

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise RuntimeError("power cut")

    out = tmp_path / "cut"
    cfg = fast(models / "moe", out, data / "text.txt", max_steps=6, save_steps=2)
    first = Batches()
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(cfg, progress=False, callbacks=[Crash(), first])
    assert not out.exists() and (run_dir(out) / "checkpoint-4").is_dir()
    with pytest.raises(ConfigError, match="pass --resume to continue it or --force"):
        pretrain(cfg, progress=False)
    second = Batches()
    res = pretrain(fast(models / "moe", out, data / "text.txt", max_steps=6, save_steps=2,
                        resume_from_checkpoint=True), progress=False, callbacks=[second])
    assert res.trainer.state.global_step == 6 and res.tokens == 6 * 4 * SEQ
    assert len(first.seen) == 5 and len(second.seen) == 2  # steps 1-5, then 5-6 from checkpoint-4
    for got, want in zip(first.seen[:4] + second.seen, whole.seen):
        assert torch.equal(got, want)
    assert [e["step"] for e in res.trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    a, b = state(tmp_path / "ref"), state(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not run_dir(out).exists()


# --- MoE losses and distillation --------------------------------------------------------------


def first_step(models, data, tmp_path, name, **kw):
    """(result, logged step-1 entry, the step-1 batch) of a one-step run."""
    batches = Batches()
    res = pretrain(fast(models / "moe", tmp_path / name, data / "text.txt", max_steps=1, **kw), progress=False,
                   callbacks=[batches])
    entry = next(e for e in res.trainer.state.log_history if "loss" in e)
    return res, entry, batches.seen[0]


def test_aux_and_z_loss_add_their_weighted_terms(models, data, tmp_path):
    from transformers import AutoModelForCausalLM

    _, plain, ids = first_step(models, data, tmp_path, "plain", router_aux_loss_coef=0.0)
    _, aux, ids_aux = first_step(models, data, tmp_path, "aux", router_aux_loss_coef=0.5)
    _, z, _ = first_step(models, data, tmp_path, "z", router_aux_loss_coef=0.0, z_loss_coef=0.5)
    assert torch.equal(ids, ids_aux)  # the same batch: only the loss terms differ
    assert "aux_loss" not in plain and "z_loss" not in plain
    assert math.isclose(aux["loss"] - plain["loss"], 0.5 * aux["aux_loss"], rel_tol=1e-3)
    assert math.isclose(z["loss"] - plain["loss"], 0.5 * z["z_loss"], rel_tol=1e-3)
    # the z-loss is ST-MoE's, computed independently from the model's own outputs.router_logits
    model = AutoModelForCausalLM.from_pretrained(models / "moe")
    with torch.no_grad():
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits
    expected = torch.cat([torch.logsumexp(r, -1) for r in router_logits]).pow(2).mean().item()
    assert math.isclose(z["z_loss"], expected, rel_tol=1e-4)


def test_distillation_mixes_kl_and_never_trains_the_teacher(models, data, tmp_path):
    from safetensors.torch import load_file

    _, plain, ids = first_step(models, data, tmp_path, "plain", router_aux_loss_coef=0.0)
    res, kd, ids_kd = first_step(models, data, tmp_path, "kd", router_aux_loss_coef=0.0,
                                 teacher=str(models / "dense"), distill_weight=0.25, distill_temperature=2.0)
    assert torch.equal(ids, ids_kd)
    assert math.isclose(kd["lm_loss"], plain["loss"], rel_tol=1e-4)  # the same LM term, unfused
    assert kd["distill_kl"] > 0
    assert math.isclose(kd["loss"], 0.75 * kd["lm_loss"] + 0.25 * 4.0 * kd["distill_kl"], rel_tol=1e-4)
    teacher = res.trainer.teacher
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    saved = load_file(str(models / "dense" / "model.safetensors"))
    assert all(torch.equal(p, saved[n]) for n, p in teacher.state_dict().items() if n in saved)


# --- what trains -----------------------------------------------------------------------------


def test_train_router_leaves_everything_else_bit_identical(models, data, tmp_path, capsys):
    out = tmp_path / "router"
    rc = main(["pretrain", str(models / "moe"), str(out), "--data", str(data / "text.txt"), "--train", "router",
               "--max-steps", "3", "--max-length", str(SEQ), "--per-device-train-batch-size", "4",
               "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2", "--report-to", "none",
               "--experts-implementation", "batched_mm", "--aux-loss-coef", "0.01"])
    assert rc == 0, capsys.readouterr().err
    before, after = state(models / "moe"), state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(re.search(r"\.block_sparse_moe\.gate\.weight$|\.mlp\.gate\.weight$", k) for k in changed)


def test_router_warmup_trains_routers_alone_first(models, data, tmp_path):
    from transformers import TrainerCallback

    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    pretrain(fast(models / "moe", tmp_path / "w", data / "text.txt", max_steps=4, router_warmup_steps=2),
             progress=False, callbacks=[Snap()])
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(models / "moe").state_dict()
    moved = lambda step: {k for k in start if not torch.equal(start[k], snapshots[step][k])}
    assert moved(2) and all(k.endswith("mlp.gate.weight") for k in moved(2))
    assert any(".experts." in k for k in moved(4)) and any("self_attn" in k for k in moved(4))


# --- data: mixture, cache, streaming ---------------------------------------------------------


def test_mixture_follows_weights_and_seed(models, data):
    from moekit.pretrain.data import prepare_data
    from moekit.train.trainer import load_tokenizer

    tok = load_tokenizer(models / "moe")
    a_id = tok.convert_tokens_to_ids("a")

    def blocks(seed, weights=(3, 1), stopping="first_exhausted"):
        cfg = fast("m", "o", [str(data / "a.jsonl"), str(data / "b.jsonl")], weights=list(weights), seed=seed,
                   mixture_stopping=stopping)
        return [tuple(b) for b in prepare_data(cfg, tok).train["input_ids"]]

    mixed = blocks(0)
    share = sum(a_id in b for b in mixed) / len(mixed)  # a block holds one source's letter (and EOS)
    assert len(mixed) > 100 and 0.68 < share < 0.82
    assert blocks(0) == mixed and blocks(1) != mixed  # deterministic under a seed
    everything = blocks(0, stopping="all_exhausted")
    assert len(everything) > len(mixed) and 0.68 < sum(a_id in b for b in everything) / len(everything) < 0.82


def test_tokenised_blocks_are_cached_by_data_tokenizer_and_settings(models, data, tmp_path, monkeypatch):
    import moekit.pretrain.data as pd
    from moekit.train.trainer import load_tokenizer

    src = tmp_path / "corpus.txt"
    src.write_text((data / "text.txt").read_text())
    tok = load_tokenizer(models / "moe")
    first = pd.prepare_data(fast("m", "o", src), tok)
    assert first.sources[0].cached is False

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(pd, "pack_batch", no_tokenising)
    again = pd.prepare_data(fast("m", "o", src), tok)
    assert again.sources[0].cached is True and again.train["input_ids"] == first.train["input_ids"]
    with pytest.raises(AssertionError, match="tokenised again"):  # other settings: other blocks
        pd.prepare_data(fast("m", "o", src, max_length=SEQ // 2), tok)
    other = make_tokenizer()
    other.add_tokens(["the"])
    with pytest.raises(AssertionError, match="tokenised again"):  # another tokenizer: other blocks
        pd.prepare_data(fast("m", "o", src), other)


def test_streaming_dense_model_with_max_tokens(models, data, tmp_path):
    res = pretrain(fast(models / "dense", tmp_path / "s", [str(data / "a.jsonl"), str(data / "b.jsonl")],
                        weights=[1, 1], streaming=True, max_steps=-1, max_tokens=3 * 4 * SEQ - 5,
                        eval_data=[str(data / "heldout.txt")], eval_tokens=4 * SEQ, eval_steps=3), progress=False)
    assert res.trainer.state.global_step == 3 and res.tokens == 3 * 4 * SEQ
    assert "perplexity" in res.metrics and "expert_load_max_min" not in res.metrics
    assert (tmp_path / "s" / "config.json").is_file()


def test_builtin_text_trains_on_one_part_and_holds_out_the_other(models):
    from moekit.pretrain.data import prepare_data
    from moekit.text import builtin_texts
    from moekit.train.trainer import load_tokenizer

    tok = load_tokenizer(models / "moe")
    got = prepare_data(fast("m", "o", ["builtin"], eval_data=["builtin:eval"], max_length=256), tok)
    decode = lambda ds: "".join(tok.decode(b) for b in ds["input_ids"])
    train_text, eval_text = decode(got.train), decode(got.eval)
    calib, held = builtin_texts("calib"), builtin_texts("eval")
    assert held[0][:200] in eval_text and held[0][:200] not in train_text
    assert calib[0][:200] in train_text and calib[0][:200] not in eval_text


# --- errors: one line, exit 1, nothing written -------------------------------------------------


def _fails(argv, capsys, match, out):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists() and not run_dir(out).exists()


@pytest.mark.parametrize("extra,match", [
    (["--data", "{d}/missing.txt"], r"moekit pretrain: error: data file .*missing.txt does not exist"),
    (["--data", "{d}/empty.txt"], r"data .*empty.txt is empty — check the file"),
    (["--data", "{d}/tiny.txt"], r"tiny.txt holds fewer than max_length=32 tokens — give more text or lower --max-length"),
    (["--data", "{d}/bad.jsonl"], r"has columns content and no 'text' — rename the column"),
    (["--data", "{d}/a.jsonl", "--data", "{d}/b.jsonl", "--weights", "1", "2", "3"],
     r"3 weights for 2 data sources — give one --weights value per --data source"),
    (["--data", "{d}/a.jsonl", "--teacher", "{m}/other_tok"],
     r"teacher .*other_tok does not share .*moe's tokenizer \(different vocabularies\)"),
    (["--data", "{d}/a.jsonl", "--train", "experts", "--z-loss-coef", "0.01"],
     r"z_loss_coef=0.01 needs the router trained — add router to --train"),
    (["--data", "{d}/a.jsonl", "--max-steps", "5", "--max-tokens", "100"], r"give one of --max-tokens and --max-steps"),
    (["--data", "{d}/a.jsonl", "--streaming"], r"streaming data has no known length — give --max-steps or --max-tokens"),
], ids=["missing", "empty", "too-short", "no-text-column", "weights", "teacher-tokenizer", "z-frozen-router",
        "steps-and-tokens", "streaming-length"])
def test_bad_input_is_one_line(models, data, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    argv = ["pretrain", str(models / "moe"), str(out), "--max-length", str(SEQ), "--report-to", "none",
            *[a.format(d=data, m=models) for a in extra]]
    _fails(argv, capsys, match, out)


def test_unknown_recipe_key_and_dense_moe_settings(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"pretrain:\n  data: [{data / 'a.jsonl'}]\n  z_los_coef: 0.1\n")
    _fails(["pretrain", str(models / "moe"), str(out), "--config", str(recipe)], capsys,
           r"unknown key pretrain.z_los_coef — valid keys:", out)
    _fails(["pretrain", str(models / "dense"), str(out), "--data", str(data / "a.jsonl"), "--aux-loss-coef", "0.1"],
           capsys, r"router_aux_loss_coef=0.1 needs an MoE model, and .*dense is a dense llama", out)


def test_recipe_sources_accept_hub_syntax_and_mappings():
    from moekit.pretrain.config import Source, parse_source

    assert parse_source("wikitext:wikitext-103-raw-v1@validation") == Source("wikitext", "wikitext-103-raw-v1",
                                                                               split="validation")
    assert parse_source({"path": "org/corpus", "data_dir": "train/web"}).data_dir == "train/web"
    with pytest.raises(ConfigError, match="a source mapping needs `path`"):
        parse_source({"path": "x", "dir": "y"})
