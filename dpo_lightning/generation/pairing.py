"""Pure: the judge's scores of one prompt's N responses -> preference pairs (chosen, rejected indices).

Three strategies, chosen by name (`PAIRING_STRATEGIES`):

- ``all``: every pair (i, j) with ``score_i > score_j``, ordered by i then j: N responses give up to
  N(N-1)/2 pairs, all the information the scores hold, but each response appears in many pairs;
- ``best_vs_worst``: one pair, the highest score against the lowest (RLHFlow's online-DPO recipe);
- ``best_vs_rest``: the highest score against every response scored strictly lower.

Worked example, ``scores = [0.2, 0.9, 0.5, 0.9, None]``: response 4 is unscored (left out); 1 and 3
tie for best and the lowest index, 1, is taken as the best.

    all            -> [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)], ties 1 ((1, 3))
    best_vs_worst  -> [(1, 0)]
    best_vs_rest   -> [(1, 0), (1, 2)], ties 1 ((1, 3))

What is left out is counted, never dropped silently: equal scores (``ties``: there is no preference),
differences above 0 but below ``min_margin`` (``below_margin``; a difference within float rounding of
the margin, such as ``0.6 - 0.4`` against 0.2, meets it), unscored responses (``unscored``).
Identical response *texts* with different scores are not a special case here: the data module drops
pairs whose sides are equal, and counts them (docs/data.md).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

Strategy: TypeAlias = Literal["all", "best_vs_worst", "best_vs_rest"]


class Pairing(NamedTuple):
    """The pairs of one prompt and what was left out."""

    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into the prompt's responses
    ties: int  # candidate pairs dropped because both scores were equal
    below_margin: int  # candidate pairs dropped because 0 < difference < min_margin
    unscored: int  # responses the judge could not score (None): in no pair


# (index, score) of the scored responses, in index order -> (pairs, ties, below_margin)
_Counted: TypeAlias = tuple[list[tuple[int, int]], int, int]


def _meets(difference: float, min_margin: float) -> bool:
    """``difference >= min_margin``, where a difference within float rounding of the margin meets it
    (``0.6 - 0.4 == 0.19999999999999996`` meets 0.2). ``difference`` is > 0."""
    return difference >= min_margin or math.isclose(difference, min_margin, rel_tol=1e-9, abs_tol=1e-12)


def _judge_pair(better: tuple[int, float], worse: tuple[int, float], min_margin: float) -> str:
    """'tie', 'below' or 'pair' for a candidate pair where ``better``'s score >= ``worse``'s."""
    difference = better[1] - worse[1]
    if difference == 0:
        return "tie"
    return "pair" if _meets(difference, min_margin) else "below"


def _best(scored: list[tuple[int, float]]) -> tuple[int, float]:
    """The highest score; among equal ones the lowest index (``max`` keeps the first maximum)."""
    return max(scored, key=lambda item: item[1])


def _all(scored: list[tuple[int, float]], min_margin: float) -> _Counted:
    pairs, ties, below = [], 0, 0
    for a, (i, si) in enumerate(scored):
        for j, sj in scored[a + 1 :]:  # each unordered pair once
            high, low = ((i, si), (j, sj)) if si >= sj else ((j, sj), (i, si))
            verdict = _judge_pair(high, low, min_margin)
            if verdict == "pair":
                pairs.append((high[0], low[0]))
            ties += verdict == "tie"
            below += verdict == "below"
    return sorted(pairs), ties, below


def _best_vs_worst(scored: list[tuple[int, float]], min_margin: float) -> _Counted:
    if len(scored) < 2:
        return [], 0, 0
    best = _best(scored)
    worst = min(scored, key=lambda item: item[1])  # the lowest index among equal minima
    verdict = _judge_pair(best, worst, min_margin)
    pair = [(best[0], worst[0])] if verdict == "pair" else []
    return pair, int(verdict == "tie"), int(verdict == "below")


def _best_vs_rest(scored: list[tuple[int, float]], min_margin: float) -> _Counted:
    if len(scored) < 2:
        return [], 0, 0
    best = _best(scored)
    pairs, ties, below = [], 0, 0
    for other in scored:
        if other[0] == best[0]:
            continue
        verdict = _judge_pair(best, other, min_margin)
        if verdict == "pair":
            pairs.append((best[0], other[0]))
        ties += verdict == "tie"
        below += verdict == "below"
    return pairs, ties, below


# Strategy name -> function of (the scored (index, score) items in index order, min_margin).
PAIRING_STRATEGIES: dict[str, Callable[[list[tuple[int, float]], float], _Counted]] = {
    "all": _all,
    "best_vs_worst": _best_vs_worst,
    "best_vs_rest": _best_vs_rest,
}


def check_strategy(strategy: str, min_margin: float = 0.0) -> None:
    """ValueError for an unknown strategy name or a negative / non-finite ``min_margin``."""
    if strategy not in PAIRING_STRATEGIES:
        raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {', '.join(PAIRING_STRATEGIES)}")
    number = isinstance(min_margin, numbers.Real) and not isinstance(min_margin, bool)
    if not (number and math.isfinite(min_margin) and min_margin >= 0):
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin!r}")


def make_pairs(scores: Sequence[float | None], strategy: Strategy, min_margin: float = 0.0) -> Pairing:
    """Preference pairs among one prompt's responses from their scores (None: unscored, left out).

    A pair ``(c, r)`` means response c is chosen over response r: ``scores[c] - scores[r] >= min_margin``
    and > 0. Deterministic: the order of the pairs and the choice among equal best (or worst) scores
    (the lowest index) depend only on the scores. A NaN or infinite score is a ValueError (judges
    report a row they cannot score as None).
    """
    check_strategy(strategy, min_margin)
    scored = []
    for i, score in enumerate(scores):
        if score is None:
            continue
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise ValueError(f"score {i} is {score!r}; expected a finite number, or None for a response not scored")
        scored.append((i, float(score)))
    pairs, ties, below = PAIRING_STRATEGIES[strategy](scored, min_margin)
    return Pairing(pairs, ties, below, len(scores) - len(scored))


@dataclass
class PairingTotals:
    """`Pairing` counts summed over many prompts, for one summary line (`summary`)."""

    prompts: int = 0
    responses: int = 0
    pairs: int = 0
    ties: int = 0
    below_margin: int = 0
    unscored: int = 0
    prompts_without_pairs: int = 0
    empty: int = 0  # scored responses left out because they are empty (no text a pair can train on)

    def add(self, pairing: Pairing, responses: int, empty: int = 0) -> None:
        """Count one prompt's `pairing` of its ``responses`` responses, ``empty`` of which (scored, but
        with no text) were left out before pairing (and so are among ``pairing.unscored``)."""
        self.prompts += 1
        self.responses += responses
        self.pairs += len(pairing.pairs)
        self.ties += pairing.ties
        self.below_margin += pairing.below_margin
        self.unscored += pairing.unscored - empty
        self.empty += empty
        self.prompts_without_pairs += not pairing.pairs

    @property
    def dropped(self) -> bool:
        """Whether anything was left out (a tie, a pair below the margin, an unscored response)."""
        return bool(self.ties or self.below_margin or self.unscored or self.empty)

    def summary(self, strategy: str, min_margin: float = 0.0) -> str:
        """One line, e.g. ``"2 prompts, 10 responses -> 5 pairs (strategy 'all', min_margin 0.1); left
        out: 1 tied candidate pair, 3 below the margin, 1 unscored response; 1 prompt gave no pair"``."""
        head = (f"{_n(self.prompts, 'prompt')}, {_n(self.responses, 'response')} -> {_n(self.pairs, 'pair')} "
                f"(strategy {strategy!r}, min_margin {min_margin:g})")
        out = [f"{_n(self.ties, 'tied candidate pair')}" if self.ties else "",
               f"{self.below_margin} below the margin" if self.below_margin else "",
               f"{_n(self.unscored, 'unscored response')}" if self.unscored else "",
               f"{_n(self.empty, 'empty response')}" if self.empty else ""]
        left_out = ", ".join(part for part in out if part)
        line = head + (f"; left out: {left_out}" if left_out else "")
        if self.prompts_without_pairs:
            line += f"; {_n(self.prompts_without_pairs, 'prompt')} gave no pair"
        return line


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


__all__ = ["PAIRING_STRATEGIES", "Pairing", "PairingTotals", "Strategy", "check_strategy", "make_pairs"]
