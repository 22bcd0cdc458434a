"""How each round's policy is measured on held-out prompts (`Evaluation`, `evaluate_policy`): sampled
responses scored by the judge, the win rate against the starting model, KL(policy || reference) on the exact
sampled ids, and, for a task with a ground-truth check, the greedy exact rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import sort_exact
from dpo_lightning.generation.judges import resolve_judge
from dpo_lightning.generation.module import _until_eos
from dpo_lightning.generation.sampling import decode_response
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.models.logprobs import sequence_logps


@dataclass
class Evaluation:
    """How each round's policy is measured on held-out prompts.

    Args:
        dataset: Prompt source (as ``PromptDataModule.dataset``).
        split: Its split of held-out prompts.
        limit: How many prompts.
        judge: ``function:pkg.mod:fn`` or ``reward_model:<folder>``: the score of a response.
        num_samples: Samples per prompt (temperature 1) for reward, win rate and KL.
        max_new_tokens: Longest sampled response.
        seed: Sampling seed.
        data_seed: Seed of a ``synthetic:`` dataset: the stage recipes' 0, whose validation prompts none of
            their training prompts repeat (with another seed, short prompts would).
        enabled: False: no report is computed (each round's folders are still written; the reason is logged),
            for runs where sampling the held-out prompts on one device would take longer than it is worth.
        device: Where the report's models run: ``auto`` (the first CUDA device if there is one, else the
            CPU), ``cpu``, ``cuda``, ``cuda:1``... The report runs on the global rank 0 process only.
        dtype: The report's models' dtype (``bfloat16``...); None: as saved (a 7B policy, its start and its
            reference in float32 take ~81 GB, more than one 80 GB GPU holds: use ``bfloat16`` there).
    """

    dataset: str = "synthetic:sort"
    split: str = "validation"
    limit: int | None = 200
    judge: str = "function:dpo_lightning.data.synthetic:sort_reward"
    num_samples: int = 4
    max_new_tokens: int = 12
    seed: int = 0
    data_seed: int = 0
    enabled: bool = True
    device: str = "auto"
    dtype: str | None = None


@torch.no_grad()
def sample_with_ids(model, data, num_samples: int, max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """For each prompt of ``data`` (a `PromptDataModule`): ``num_samples`` sampled responses, as text and as
    the exact sampled ids (up to and including EOS), with the prompt ids."""
    tokenizer = data.tokenizer
    model.eval()
    out = []
    torch.manual_seed(seed)
    loader = data._loader(data.prompts, data.hparams.batch_size, shuffle=False)
    for batch in loader:
        ids = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device), do_sample=True,
                             num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = batch["input_ids"].shape[1]
        for i, prompt in enumerate(batch["prompt"]):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            samples = []
            for row in ids[i * num_samples : (i + 1) * num_samples, width:].cpu().tolist():
                row = _until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
                samples.append((row, decode_response(tokenizer, prompt_ids, row)))
            out.append({"prompt": json.loads(prompt), "prompt_ids": prompt_ids, "samples": samples})
    return out


@torch.no_grad()
def response_logps(model, prompt_ids: list[int], responses: list[list[int]]) -> torch.Tensor:
    """Summed log-probs ``(n,)`` of each response's exact ids after the prompt, under ``model``."""
    rows = [prompt_ids + r for r in responses]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, response) in enumerate(zip(rows, responses)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        if response:
            labels[i, len(prompt_ids) : len(row)] = torch.tensor(response, dtype=torch.long)
    logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
    return sequence_logps(logits, labels.to(model.device)).logps.cpu()


def evaluation_prompts(evaluation: Evaluation, tokenizer: Any):
    """The held-out prompts of ``evaluation`` as a `PromptDataModule` (batches of 64)."""
    return PromptDataModule(tokenizer=tokenizer, dataset=evaluation.dataset, split=evaluation.split,
                            limit=evaluation.limit, batch_size=64, seed=evaluation.data_seed, drop_columns=None)


def exact_check(dataset: str):
    """The task's ground-truth pass/fail check ``(prompt, response) -> bool``, or None when it has none."""
    if dataset == "synthetic:sort":
        return sort_exact
    return None


@torch.no_grad()
def greedy_exact_rate(model, data, check, max_new_tokens: int) -> float:
    """The share of ``data``'s prompts whose greedy answer (at most ``max_new_tokens``) passes ``check``."""
    tokenizer = data.tokenizer
    passed = total = 0
    for batch in data._loader(data.prompts, data.hparams.batch_size, shuffle=False):
        ids = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for i, (prompt, row) in enumerate(zip(batch["prompt"], ids[:, batch["input_ids"].shape[1]:].cpu().tolist())):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            row = _until_eos(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            passed += bool(check(json.loads(prompt), decode_response(tokenizer, prompt_ids, row)))
            total += 1
    return passed / max(total, 1)


def evaluate_policy(policy: str, start: str, reference: str, evaluation: Evaluation) -> dict[str, float]:
    """Mean judge score of the policy's samples on held-out prompts, win rate against ``start``'s samples
    (i-th sample against i-th sample; a tie counts half), and KL(policy || reference) estimated on the
    policy's samples as the mean of sum_t [log pi(y_t) - log ref(y_t)], with its standard error. For a
    task with a ground-truth pass/fail check (`exact_check`), first ``exact``: the share of the prompts
    whose greedy answer passes it."""
    data = evaluation_prompts(evaluation, policy)
    judge = resolve_judge(evaluation.judge)
    device = evaluation.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {name: load_causal_lm(path, dtype=evaluation.dtype).to(device).eval() for name, path in
              {"policy": policy, "start": start, "reference": reference}.items()}
    ours = sample_with_ids(models["policy"], data, evaluation.num_samples, evaluation.max_new_tokens, evaluation.seed)
    theirs = sample_with_ids(models["start"], data, evaluation.num_samples, evaluation.max_new_tokens, evaluation.seed)

    def score(rows: list[dict[str, Any]]) -> list[float | None]:
        prompts = [r["prompt"] for r in rows for _ in r["samples"]]
        return judge.score(prompts, [text for r in rows for _, text in r["samples"]])

    mine, base = score(ours), score(theirs)
    pairs = [(a, b) for a, b in zip(mine, base) if a is not None and b is not None]
    kls = []
    for row in ours:
        ids = [s for s, _ in row["samples"]]
        kls += (response_logps(models["policy"], row["prompt_ids"], ids)
                - response_logps(models["reference"], row["prompt_ids"], ids)).tolist()
    kl = torch.tensor(kls, dtype=torch.float64)
    scored = [s for s in mine if s is not None]
    check = exact_check(evaluation.dataset)
    exact = {} if check is None else {
        "exact": greedy_exact_rate(models["policy"], data, check, evaluation.max_new_tokens)}
    return {
        **exact,
        "reward": sum(scored) / max(len(scored), 1),
        "win_rate": sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(len(pairs), 1),
        "kl": kl.mean().item(),
        "kl_stderr": (kl.std().item() / math.sqrt(len(kls))) if len(kls) > 1 else 0.0,
    }
