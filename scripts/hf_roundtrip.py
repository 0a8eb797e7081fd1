#!/usr/bin/env python3
"""Checks that what `retort distill` writes loads back into Hugging Face tools.

Trains a full fine-tune and a LoRA adapter of a small model with `retort distill`, scores one
completion with `retort score`, then loads the full model with transformers'
`AutoModelForCausalLM` and the adapter with PEFT's `AutoPeftModelForCausalLM`, and compares the
per-token log-probs. Exits non-zero when they differ by more than the tolerance or when the
adapter changed nothing.

Needs torch, transformers and peft (not part of CI: the torch wheel is several GB):

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install -r ../shared/bench/requirements.txt peft
    cargo build --release
    /tmp/hf/bin/python scripts/hf_roundtrip.py [--retort target/release/retort] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

TOLERANCE = 1e-4


def run(*args: str) -> None:
    subprocess.run(args, check=True)


def hf_logprobs(model, tokenizer, prompt: str, completion: str) -> list[float]:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return [logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion_ids)]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retort", default=str(root / "target/release/retort"))
    parser.add_argument("--model", default=str(root.parent / "shared/fixtures/qwen2-tiny"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [
            {"id": f"r{i}", "prompt": f"Q: {i} + {i + 3} = ?\nA:",
             "response": f" {i} plus {i + 3} is {2 * i + 3}. The answer is {2 * i + 3}.",
             "finish_reason": "stop"}
            for i in range(8)
        ]
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        item = {"id": "s0", "prompt": "Q: 2 + 5 = ?\nA:",
                "completion": " 2 plus 5 is 7. The answer is 7."}
        (tmp / "score.jsonl").write_text(json.dumps(item) + "\n")
        common = ["distill", "--objective", "sft", "--max-steps", "30", "--batch-size", "4",
                  "--lr", "1e-3", "--student", args.model, "--data", str(tmp / "train.jsonl")]
        run(args.retort, "-q", *common, "--output", str(tmp / "full"))
        run(args.retort, "-q", *common, "--lora-rank", "4", "--lora-alpha", "8",
            "--output", str(tmp / "lora"))

        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        base_tok = AutoTokenizer.from_pretrained(args.model)
        base_lp = hf_logprobs(base, base_tok, item["prompt"], item["completion"])
        failed = False
        for name, load in [("full", AutoModelForCausalLM), ("lora", AutoPeftModelForCausalLM)]:
            folder = tmp / name
            run(args.retort, "-q", "score", "--model", str(folder),
                "--input", str(tmp / "score.jsonl"), "--output", str(tmp / f"{name}.jsonl"))
            ours = json.loads((tmp / f"{name}.jsonl").read_text().splitlines()[0])["token_logprobs"]
            model = load.from_pretrained(str(folder), dtype=torch.float32).eval()
            theirs = hf_logprobs(model, AutoTokenizer.from_pretrained(str(folder)),
                                 item["prompt"], item["completion"])
            diff = max(abs(a - b) for a, b in zip(ours, theirs))
            moved = max(abs(a - b) for a, b in zip(theirs, base_lp))
            ok = len(ours) == len(theirs) and diff <= TOLERANCE and moved > 1e-2
            failed |= not ok
            print(f"{name}: {type(model).__name__}, {len(theirs)} tokens, "
                  f"max |retort - transformers| = {diff:.2e}, moved from the base by {moved:.3f}"
                  f" {'ok' if ok else 'FAILED'}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
