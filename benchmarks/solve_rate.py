"""Greedy solve rate of a model on the held-out prompts of the offline sorting task.

    python benchmarks/solve_rate.py runs/tiny_sft/version_0/hf_export [more export folders ...]

For each folder (any causal LM export with its tokenizer, e.g. the SFT or DPO stage's ``hf_export``)
prints the share of the 200 held-out prompts of ``synthetic:sort`` (seed 0, the recipes' validation
split) whose greedy answer is exactly the sorted digits, and the mean ground-truth reward
(``synthetic.sort_reward``: the fraction of positions right). These are the figures in
docs/recipes.md for ``tiny_sft.yaml`` and for DPO started from its export.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.data.synthetic import load_dataset, sort_reward
from dpo_lightning.generation.sampling import generate


def solve_rate(folder: str, seed: int = 0) -> tuple[float, float]:
    """(exact-sort share, mean reward) of ``folder``'s greedy answers on the held-out prompts."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = load_dataset(seed=seed)["validation"]["prompt"]
    answers = generate(model, tokenizer, prompts, max_new_tokens=12)
    rewards = [sort_reward(p, a) for p, a in zip(prompts, answers)]
    return sum(r == 1.0 for r in rewards) / len(rewards), sum(rewards) / len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="Hugging Face export folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (the recipes use 0)")
    args = parser.parse_args()
    for folder in args.folders:
        solved, reward = solve_rate(folder, args.seed)
        print(f"{folder}: solved {solved:.3f} of 200 held-out prompts (greedy), mean reward {reward:.3f}")


if __name__ == "__main__":
    main()
