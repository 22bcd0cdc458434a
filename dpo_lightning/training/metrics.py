"""Every stage's metrics, named as TRL logs them, exact across ranks and over a whole window.

Every metric keeps a running sum and a weight in a torchmetrics ``MeanMetric``, so the value
logged for a window of steps (or a whole validation epoch) is the mean over every pair (or
token) in it, synced across ranks as sums, never a mean of per-batch or per-rank means.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MaxMetric, MeanMetric, MinMetric

# TRL's metric names, in the order we log them.
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)


class RunningMeans(nn.Module):
    """One ``MeanMetric`` per name for one split (train, val or test); every stage's metrics derive from it."""

    def __init__(self, prefix: str, names: tuple[str, ...], extremes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.prefix = prefix
        # ModuleDict keys may not contain "/" or "."; map TRL names to safe keys. Names starting
        # with min_/max_ in `extremes` keep a minimum / maximum instead of a mean.
        metrics = {_key(n): MeanMetric() for n in names}
        for name in extremes:
            metrics[_key(name)] = MinMetric() if name.startswith("min_") else MaxMetric()
        self.means = nn.ModuleDict(metrics)

    def reset(self) -> None:
        for metric in self.means.values():
            metric.reset()

    @property
    def has_updates(self) -> bool:
        return bool(self.means[_key("loss")].update_count)


class PreferenceMetrics(RunningMeans):
    """Running means of the per-pair statistics of one stage (``train``, ``val`` or ``test``).

    ``update`` takes ``(B,)`` tensors for one batch; ``compute`` returns ``{"{prefix}/{name}":
    value}`` for all pairs seen since the last ``reset`` on all ranks.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix, METRIC_NAMES)

    def update(
        self,
        *,
        losses: Tensor,
        chosen_rewards: Tensor,
        rejected_rewards: Tensor,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        chosen_logits_sum: Tensor,
        rejected_logits_sum: Tensor,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
        entropy_sum: Tensor | None = None,
        chosen_correct: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> None:
        """Add one batch of B pairs; every argument has shape ``(B,)``, ``entropy_sum`` ``(2B,)`` (chosen first).

        ``weight`` counts each pair (1) or leaves it out (0: the padding an uneven eval shard
        repeats, see ``data/sampler.py``); every pair counts when None. ``entropy_sum``: each
        response's summed per-token entropy; ``chosen_correct``: the chosen response's tokens whose label
        is the argmax (TRL's ``entropy`` over every response token, ``mean_token_accuracy`` over the
        chosen ones); without them those two are not logged.
        """
        w = 1.0 if weight is None else weight.detach().float()
        per_pair = {
            "loss": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            # A tie counts as wrong, as in TRL.
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps,
            "logps/rejected": rejected_logps,
        }
        for name, value in per_pair.items():
            self.means[_key(name)].update(value.detach().float(), w)
        # TRL's logits/* is the mean logit over every response token of the batch: a mean
        # weighted by token counts, not a mean of per-sequence means.
        for name, total, count in (
            ("logits/chosen", chosen_logits_sum, chosen_tokens),
            ("logits/rejected", rejected_logits_sum, rejected_tokens),
        ):
            count = count.detach().float()
            keep = count > 0
            if keep.any():
                tokens = (count * w)[keep]  # a padded pair's tokens count 0
                self.means[_key(name)].update(total.detach().float()[keep] / count[keep], tokens)
        both = torch.cat([chosen_tokens, rejected_tokens])
        per_token = (
            ("entropy", entropy_sum, both.detach().float(), torch.cat([w, w]) if torch.is_tensor(w) else w),
            ("mean_token_accuracy", chosen_correct, chosen_tokens.detach().float(), w),
        )
        for name, total, count, pair_w in per_token:
            keep = count > 0
            if total is not None and keep.any():
                self.means[_key(name)].update(total.detach().float()[keep] / count[keep], (count * pair_w)[keep])

    def compute(self) -> dict[str, Tensor]:
        """Means over everything since the last reset, synced across ranks (``entropy`` and
        ``mean_token_accuracy`` only when the window had them)."""
        return {f"{self.prefix}/{n}": self.means[_key(n)].compute() for n in METRIC_NAMES
                if n not in _OPTIONAL or self.means[_key(n)].update_count}



def _key(name: str) -> str:
    return name.replace("/", "__")


_OPTIONAL = ("entropy", "mean_token_accuracy")  # logged when the caller gives them (DPOModule does)


# TRL KTOTrainer's metric names, in the order we log them.
KTO_METRIC_NAMES = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class KTOMetrics(RunningMeans):
    """KTO's metrics: desirable examples count as ``chosen``, undesirable ones as ``rejected``.

    ``rewards/chosen`` is the mean over every desirable example of the window on every rank (a
    sum and a count, synced), not a mean of per-batch means; ``rewards/margins`` is the difference
    of the two means; ``kl`` is the mean of the per-step reference points z0.
    """

    def __init__(self, prefix: str) -> None:
        # rewards/margins is derived in compute(), not accumulated.
        super().__init__(prefix, tuple(n for n in KTO_METRIC_NAMES if n != "rewards/margins"))

    def update(
        self,
        *,
        losses: Tensor,
        rewards: Tensor,
        logps: Tensor,
        desirable: Tensor,
        kl: Tensor,
        weight: Tensor | None = None,
    ) -> None:
        """One batch of N examples: ``losses``, ``rewards``, ``logps``, ``desirable`` (N,); ``kl`` scalar.

        ``weight`` (N,): 1 counts an example, 0 leaves it out (an eval shard's padding); all count
        when None. ``kl`` is the step's reference point, one value per step whatever the weights.
        """
        w = torch.ones_like(losses, dtype=torch.float32) if weight is None else weight.detach().float()
        self.means[_key("loss")].update(losses.detach().float(), w)
        self.means[_key("kl")].update(kl.detach().float().reshape(1))
        for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
            if mask.any():
                self.means[_key(f"rewards/{side}")].update(rewards.detach().float()[mask], w[mask])
                self.means[_key(f"logps/{side}")].update(logps.detach().float()[mask], w[mask])

    def compute(self) -> dict[str, Tensor]:
        # Every rank computes every mean (each is a collective); a side that had no example
        # anywhere in the window comes back NaN and is left out, the same on every rank.
        values = {k.replace("__", "/"): metric.compute() for k, metric in self.means.items()}
        values = {n: v for n, v in values.items() if not torch.isnan(v)}
        if "rewards/chosen" in values and "rewards/rejected" in values:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        return {f"{self.prefix}/{n}": values[n] for n in KTO_METRIC_NAMES if n in values}



# TRL RewardTrainer's metric names (loss, accuracy, margin, min/mean/max_reward) and the mean
# reward of each side, in the order we log them.
REWARD_METRIC_NAMES = (
    "loss",
    "accuracy",
    "margin",
    "rewards/chosen",
    "rewards/rejected",
    "mean_reward",
    "min_reward",
    "max_reward",
)


class RewardMetrics(RunningMeans):
    """A Bradley-Terry reward model's metrics over every pair of the window on every rank.

    ``accuracy``: chosen scored strictly above rejected (a tie is wrong, as in TRL); ``margin``:
    mean of ``r_chosen - r_rejected``; ``mean_reward``/``min_reward``/``max_reward`` over both sides.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix, REWARD_METRIC_NAMES[:6], extremes=("min_reward", "max_reward"))

    def update(
        self, *, losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, weight: Tensor | None = None
    ) -> None:
        """One batch of B pairs, every argument ``(B,)``; ``weight`` 0 leaves a pair out (eval padding)."""
        w = torch.ones_like(losses, dtype=torch.float32) if weight is None else weight.detach().float()
        chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
        per_pair = {
            "loss": losses.detach().float(),
            "accuracy": (chosen > rejected).float(),
            "margin": chosen - rejected,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
        }
        for name, value in per_pair.items():
            self.means[_key(name)].update(value, w)
        both, both_w = torch.cat([chosen, rejected]), torch.cat([w, w])
        self.means[_key("mean_reward")].update(both, both_w)
        counted = both[both_w > 0]
        if counted.numel():
            self.means[_key("min_reward")].update(counted.min())
            self.means[_key("max_reward")].update(counted.max())

    def compute(self) -> dict[str, Tensor]:
        return {f"{self.prefix}/{n}": self.means[_key(n)].compute() for n in REWARD_METRIC_NAMES}


# What SFT logs, TRL's names: the loss, token accuracy and entropy are means over every loss token of the
# window; perplexity is exp(loss).
SFT_METRIC_NAMES = ("loss", "mean_token_accuracy", "entropy", "perplexity")


class SFTMetrics(RunningMeans):
    """SFT's metrics: token-weighted over every loss token of the window on every rank.

    ``loss`` is the summed NLL of the loss tokens divided by their number (not a mean of
    per-batch or per-sequence means); ``mean_token_accuracy`` the share of loss tokens whose label is
    the argmax of the logits; ``entropy`` the mean predictive entropy at the loss tokens (nats);
    ``perplexity`` is ``exp(loss)``. (The accuracy's state keeps its older key, ``token_accuracy``, so
    checkpoints written before the rename resume.)
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix, ("loss", "token_accuracy", "entropy"))

    def update(
        self, *, nll: Tensor, n_tokens: Tensor, n_correct: Tensor, entropy_sum: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> None:
        """Per-sequence sums ``(N,)``: NLL of the loss tokens, their number, the argmax hits, the entropy;
        ``weight`` (N,)."""
        n = n_tokens.detach().float()
        w = n if weight is None else n * weight.detach().float()  # a sequence counts by its tokens
        n_safe = n.clamp_min(1.0)  # a sequence without loss tokens has weight 0 anyway
        self.means[_key("loss")].update(nll.detach().float() / n_safe, w)
        self.means[_key("token_accuracy")].update(n_correct.detach().float() / n_safe, w)
        if entropy_sum is not None:
            self.means[_key("entropy")].update(entropy_sum.detach().float() / n_safe, w)

    def compute(self) -> dict[str, Tensor]:
        loss = self.means[_key("loss")].compute()
        values = {
            f"{self.prefix}/loss": loss,
            f"{self.prefix}/mean_token_accuracy": self.means[_key("token_accuracy")].compute(),
            f"{self.prefix}/entropy": self.means[_key("entropy")].compute(),
            f"{self.prefix}/perplexity": torch.exp(loss),
        }
        if not self.means[_key("entropy")].update_count:
            del values[f"{self.prefix}/entropy"]
        return values
