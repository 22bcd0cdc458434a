"""pairing.make_pairs: each strategy on hand-made scores, ties, min_margin, unscored responses, order."""

from __future__ import annotations

import math

import pytest

from dpo_lightning.generation.pairing import PAIRING_STRATEGIES, Pairing, PairingTotals, make_pairs

# Response 4 is unscored; 1 and 3 tie for best (0.9); 0 is the worst (0.2).
SCORES = [0.2, 0.9, 0.5, 0.9, None]


def test_all_pairs_every_strictly_better_response_with_every_worse_one():
    """Scored: 0:0.2, 1:0.9, 2:0.5, 3:0.9. Unordered pairs (6): (0,1) 1>0, (0,2) 2>0, (0,3) 3>0,
    (1,2) 1>2, (1,3) tie, (2,3) 3>2 -> pairs by chosen then rejected index:
    [(1,0), (1,2), (2,0), (3,0), (3,2)]; 1 tie; response 4 unscored."""
    assert make_pairs(SCORES, "all") == Pairing([(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)], 1, 0, 1)


def test_all_with_a_margin_counts_the_pairs_below_it():
    """min_margin 0.5: differences (1,0) 0.7, (1,2) 0.4, (2,0) 0.3, (3,0) 0.7, (3,2) 0.4 -> keep (1,0)
    and (3,0); 3 below the margin; the tie stays a tie (not 'below')."""
    assert make_pairs(SCORES, "all", min_margin=0.5) == Pairing([(1, 0), (3, 0)], 1, 3, 1)


def test_best_vs_worst_takes_the_lowest_index_among_equal_best():
    """Best 0.9 at 1 and 3 -> 1 (lowest index); worst 0.2 at 0 -> one pair (1, 0)."""
    assert make_pairs(SCORES, "best_vs_worst") == Pairing([(1, 0)], 0, 0, 1)
    # Equal worst too: [0.5, 0.1, 0.9, 0.1] -> best 2, worst 1 (not 3).
    assert make_pairs([0.5, 0.1, 0.9, 0.1], "best_vs_worst").pairs == [(2, 1)]


def test_best_vs_worst_when_all_tie_or_the_gap_is_below_the_margin():
    """[0.3, 0.3, 0.3]: best == worst -> no pair, 1 tie. [0.3, 0.5] with margin 0.5: 0.2 < 0.5 -> 1 below."""
    assert make_pairs([0.3, 0.3, 0.3], "best_vs_worst") == Pairing([], 1, 0, 0)
    assert make_pairs([0.3, 0.5], "best_vs_worst", min_margin=0.5) == Pairing([], 0, 1, 0)


def test_best_vs_rest_pairs_the_best_with_every_strictly_lower_score():
    """Best = 1 (0.9). Others: 0 (0.2) pair, 2 (0.5) pair, 3 (0.9) tie -> [(1,0), (1,2)], 1 tie.
    With margin 0.5: (1,2) is 0.4 -> below."""
    assert make_pairs(SCORES, "best_vs_rest") == Pairing([(1, 0), (1, 2)], 1, 0, 1)
    assert make_pairs(SCORES, "best_vs_rest", min_margin=0.5) == Pairing([(1, 0)], 1, 1, 1)


@pytest.mark.parametrize("strategy", list(PAIRING_STRATEGIES))
def test_fewer_than_two_scored_responses_give_no_pair(strategy):
    assert make_pairs([None, 0.7, None], strategy) == Pairing([], 0, 0, 2)
    assert make_pairs([], strategy) == Pairing([], 0, 0, 0)


@pytest.mark.parametrize("strategy", list(PAIRING_STRATEGIES))
def test_a_difference_within_rounding_of_the_margin_meets_it(strategy):
    """0.6 - 0.4 == 0.19999999999999996 in floats; with min_margin 0.2 the pair is kept. sort_reward gives
    such fractions (3/5, 2/5)."""
    assert 0.6 - 0.4 < 0.2
    assert make_pairs([0.4, 0.6], strategy, min_margin=0.2).pairs == [(1, 0)]
    assert make_pairs([0.4, 0.59], strategy, min_margin=0.2).below_margin == 1


@pytest.mark.parametrize("strategy", list(PAIRING_STRATEGIES))
def test_the_result_depends_only_on_the_scores(strategy):
    scores = [0.1, 0.7, 0.7, 0.3, None, 0.1, 0.5]
    first = make_pairs(scores, strategy)
    assert all(make_pairs(list(scores), strategy) == first for _ in range(3))
    for c, r in first.pairs:
        assert scores[c] > scores[r]


def test_all_on_n_distinct_scores_gives_n_choose_2_pairs():
    """5 distinct scores -> 5*4/2 = 10 pairs, none dropped."""
    out = make_pairs([0.5, 0.1, 0.4, 0.2, 0.3], "all")
    assert len(out.pairs) == 10 and out.ties == out.below_margin == out.unscored == 0
    assert out.pairs == sorted(out.pairs)


@pytest.mark.parametrize(
    "scores, strategy, min_margin, match",
    [
        ([0.1, 0.2], "best_vs_all", 0.0, "unknown pairing strategy 'best_vs_all'; choose one of all, best_vs_worst"),
        ([0.1, 0.2], "all", -0.1, "min_margin must be a finite number >= 0"),
        ([0.1, 0.2], "all", math.inf, "min_margin must be a finite number >= 0"),
        ([0.1, math.nan], "all", 0.0, "score 1 is nan"),
        ([0.1, math.inf], "all", 0.0, "score 1 is inf"),
        ([0.1, "0.2"], "all", 0.0, "score 1 is '0.2'"),
    ],
)
def test_mistakes_are_refused(scores, strategy, min_margin, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        make_pairs(scores, strategy, min_margin)


def test_totals_sum_the_counts_into_one_line():
    """Prompt A = SCORES with 'all' (5 responses, 5 pairs, 1 tie, 1 unscored); prompt B = [0.3, 0.3]
    (2 responses, no pair, 1 tie) -> 2 prompts, 7 responses, 5 pairs, 2 ties, 1 unscored, 1 prompt
    without a pair."""
    totals = PairingTotals()
    totals.add(make_pairs(SCORES, "all"), len(SCORES))
    totals.add(make_pairs([0.3, 0.3], "all"), 2)
    assert totals == PairingTotals(prompts=2, responses=7, pairs=5, ties=2, below_margin=0, unscored=1,
                                   prompts_without_pairs=1)
    assert totals.dropped
    assert totals.summary("all") == (
        "2 prompts, 7 responses -> 5 pairs (strategy 'all', min_margin 0); left out: 2 tied candidate pairs, "
        "1 unscored response; 1 prompt gave no pair"
    )
    clean = PairingTotals()
    clean.add(make_pairs([0.1, 0.2], "all", 0.1), 2)
    assert not clean.dropped
    assert clean.summary("all", 0.1) == "1 prompt, 2 responses -> 1 pair (strategy 'all', min_margin 0.1)"
