"""Scores exports on the held-out sorting prompts with its own generation loop, apart from the pipeline's judge.

For each export folder (a causal LM with its tokenizer) on the 200 held-out prompts of ``synthetic:sort``
(seed 0, the recipes' validation split):

- ``exact``: the share of prompts whose **greedy** answer is exactly the sorted digits, checked here by
  comparing words (``synthetic.sort_exact``), not through the training judge; ``exact_se`` its binomial
  standard error sqrt(p (1 - p) / n). Greedy decoding runs prompt-length group by group, so no row is
  padded.
- ``greedy_reward``: the mean ``sort_reward`` (partial credit) of the greedy answers.
- ``reward`` / ``reward_se``: the mean ``sort_reward`` of ``--samples`` samples per prompt at temperature 1
  (frontier.py's ``draw``: plain ancestral sampling, no top-k/top-p, the same random stream for every
  model), standard error over prompts; ``sampled_exact``: the share of those samples that sort exactly.
- ``kl`` / ``kl_se``: KL(policy || SFT) estimated on those samples, the mean of
  sum_t [log pi(y_t) - log sft(y_t)] over the exact sampled ids (frontier.py's ``log_ratios``), standard
  error over prompts.

    python benchmarks/align_score.py --sft runs/pipeline_tiny/sft/stage/version_0/hf_export \
        runs/pipeline_tiny/round_*/dpo/version_0/hf_export

prints one JSON line per folder. ``score`` is what ``benchmarks/align_sweep.py`` calls. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import draw, log_ratios, mean_se, rewards  # noqa: E402

from dpo_lightning.data.synthetic import load_dataset, sort_exact, sort_reward  # noqa: E402
from dpo_lightning.generation.sampling import generate  # noqa: E402

SAMPLES, SEED = 16, 1234  # frontier.py's: its SFT and best-of-N rows come from the same draws


def held_out_prompts() -> list[str]:
    """The 200 held-out prompts of the recipes (synthetic:sort, seed 0, validation)."""
    return list(load_dataset("synthetic:sort", seed=0)["validation"]["prompt"])


def greedy(model, tokenizer, prompts: Sequence[str]) -> list[str]:
    """Greedy answers (at most 12 new tokens), prompt-length group by group: no padding in any row."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p.split())].append(i)
    out: list[str] = [""] * len(prompts)
    for index in groups.values():
        for i, answer in zip(index, generate(model, tokenizer, [prompts[i] for i in index], max_new_tokens=12)):
            out[i] = answer
    return out


def load(folder: str | Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def score(policy: str | Path, sft: str | Path, prompts: Sequence[str] | None = None, samples: int = SAMPLES,
          seed: int = SEED, sft_model=None) -> dict[str, float]:
    """The measures above for ``policy`` against the SFT export ``sft`` (``sft_model``: it, already loaded)."""
    prompts = list(prompts if prompts is not None else held_out_prompts())
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = load(policy)
    reference = sft_model if sft_model is not None else load(sft)
    answers = greedy(model, tokenizer, prompts)
    exact = sum(sort_exact(p, a) for p, a in zip(prompts, answers)) / len(prompts)
    draws = draw(model, tokenizer, prompts, samples, seed)
    table = rewards(tokenizer, prompts, draws, samples)  # (P, k)
    reward, reward_se = mean_se(table.mean(1))
    kl, kl_se = mean_se(log_ratios(model, reference, draws, len(prompts), samples).mean(1))
    return {
        "exact": exact, "exact_se": math.sqrt(exact * (1 - exact) / len(prompts)),
        "greedy_reward": sum(sort_reward(p, a) for p, a in zip(prompts, answers)) / len(prompts),
        "reward": reward, "reward_se": reward_se, "sampled_exact": (table == 1.0).float().mean().item(),
        "kl": kl, "kl_se": kl_se,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="export folders to score")
    parser.add_argument("--sft", required=True, help="the SFT export: the KL's reference")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per prompt at temperature 1")
    parser.add_argument("--seed", type=int, default=SEED, help="sampling seed (the same stream for every model)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts, sft = held_out_prompts(), load(args.sft)
    for folder in args.folders:
        row = score(folder, args.sft, prompts, args.samples, args.seed, sft_model=sft)
        print(json.dumps({"folder": folder, **{k: round(v, 4) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
