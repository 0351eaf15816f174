"""Two training processes on one CPU: the real ``--accelerate-config ddp`` relaunch, DDP over gloo.

What a multi-GPU user relies on, checked without GPUs: the command relaunches itself under
``accelerate launch``, both workers train on different halves of each batch, only the first
process publishes the output, the run folder is shared without races, and the result loads
stock. FSDP2 and DeepSpeed need GPUs (accelerate falls back to DDP on CPUs); on a CPU machine
they are refused up front.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import make_llama, make_tokenizer  # noqa: E402

from moekit.cli.main import main  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moekit.upcycle import UpcycleConfig, upcycle

    root = tmp_path_factory.mktemp("ddp")
    make_llama(root / "llama")
    make_tokenizer(root / "llama")
    upcycle(UpcycleConfig(str(root / "llama"), str(root / "moe"), num_experts=4, top_k=2, router="random"),
            progress=False)
    make_tokenizer(root / "moe")
    words = ["cat", "dog", "sun", "red", "big", "low", "sky", "hat"]
    (root / "text.txt").write_text("\n".join(f"the {w} sat on the mat and the {w} ran home" for w in words * 30))
    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}!"}]}
            for w in words * 4]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    return root


def moekit(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "moekit.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_pretrain_ddp_two_processes_trains_and_publishes_once(setup):
    from transformers import AutoModelForCausalLM

    proc = moekit("pretrain", "moe", "out", "--data", "text.txt", "--max-steps", "3", "--max-length", "64",
                  "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--report-to", "none",
                  "--logging-steps", "1", "--accelerate-config", "ddp", "--num-processes", "2", cwd=setup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "moekit: 2 processes: MULTI_CPU (gloo on CPU), mixed precision no" in err
    assert "256 tokens per step (64 x 2 x 1 x 2 processes), 3 steps" in err
    assert err.count("moekit: loading moe") == 1  # the second worker only warns
    log = json.loads((setup / "out" / "moekit_train_log.json").read_text())
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3] and steps[-1]["tokens"] == 3 * 256  # both halves counted
    assert not (setup / ".out.moekit-run").exists()
    model = AutoModelForCausalLM.from_pretrained(setup / "out", trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(setup / "moe")
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any(".experts." in n for n in moved) and any("self_attn" in n for n in moved)


def test_finetune_lora_ddp_writes_one_adapter(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = moekit("finetune", "moe", "sft", "--data", "chat.jsonl", "--target", "attention,experts", "--max-steps", "2",
                  "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
                  "--report-to", "none", "--accelerate-config", "ddp", "--num-processes", "2", "--merge", cwd=setup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moekit: 2 processes: MULTI_CPU" in proc.stderr
    base = AutoModelForCausalLM.from_pretrained(setup / "moe")
    adapted = PeftModel.from_pretrained(base, setup / "sft")
    merged = AutoModelForCausalLM.from_pretrained(setup / "sft" / "merged")
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["fsdp2", "zero3"])
def test_gpu_only_accelerate_configs_are_refused_on_cpu(setup, capsys, name):
    code = main(["pretrain", str(setup / "moe"), str(setup / "nope"), "--data", str(setup / "text.txt"),
                 "--accelerate-config", name])
    err = capsys.readouterr().err
    assert code == 1 and "needs CUDA GPUs" in err and "--accelerate-config ddp" in err and len(err.splitlines()) == 1
    assert not (setup / "nope").exists()
