"""Judges: FunctionJudge on hand-checked rows and failing rows, RewardModelJudge == RewardModule on the
data module's batch (string and chat-template prompts), length limits, resolve_judge, the warning."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from dpo_lightning import PreferenceDataModule, RewardModule
from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs, sort_reward
from dpo_lightning.generation.judges import (
    Failure,
    FunctionJudge,
    Judge,
    JudgeStats,
    RewardModelJudge,
    as_score,
    resolve_judge,
    warn_failures,
)
from dpo_lightning.stages.export import export_hf

from tiny import tiny_config

TINY = {**tiny_config(), "max_position_embeddings": 64}
TINY.pop("vocab_size")
SORT_REWARD = "dpo_lightning.data.synthetic:sort_reward"

# ------------------------------------------------------------------------------------------ FunctionJudge


def test_sort_reward_rows_by_hand():
    """For "sort: 3 1 4 1 5 =" the sort is 1 1 3 4 5: " 1 1 3 4 5" -> 1.0; " 1 1 4 3 5" -> 3 of 5 positions
    = 0.6; " 1 1 3 4" -> 4 of max(4, 5) = 0.8; "" -> 0.0. "sort: 2 1 =" / " 1 2" -> 1.0."""
    judge = FunctionJudge(SORT_REWARD)
    prompts = ["sort: 3 1 4 1 5 ="] * 4 + ["sort: 2 1 ="]
    responses = [" 1 1 3 4 5", " 1 1 4 3 5", " 1 1 3 4", "", " 1 2"]
    assert judge.score(prompts, responses) == [1.0, 0.6, 0.8, 0.0, 1.0]
    assert judge.stats == JudgeStats(scored=5)
    assert judge.spec() == f"function:{SORT_REWARD}"
    assert FunctionJudge(sort_reward).spec() == f"function:{SORT_REWARD}"  # a callable names itself


def flaky(prompt: str, response: str) -> object:
    """len(response), except for the responses that name a failure."""
    if response == "raise":
        raise ValueError("no digits here")
    if response == "nan":
        return math.nan
    if response == "inf":
        return -math.inf
    if response == "text":
        return "high"
    if response == "slow":
        time.sleep(3)
    return len(response)


def test_a_failing_row_is_none_and_the_others_are_scored(caplog):
    """Rows: "ab" -> 2.0; raise, nan, inf, text, slow (3 s > timeout 0.3 s) -> None each; "abc" -> 3.0.
    6 of 8 fail, one per reason; the warning lists them by reason (ties in count: alphabetical)."""
    judge = FunctionJudge(flaky, timeout_s=0.3)
    responses = ["ab", "raise", "nan", "inf", "text", "slow", "abc", ""]
    start = time.monotonic()
    scores = judge.score(["p"] * len(responses), responses)
    assert time.monotonic() - start < 2.5  # the slow call was not waited for
    assert scores == [2.0, None, None, None, None, None, 3.0, 0.0]
    assert judge.stats.scored == 3 and judge.stats.n_failed == 5 and judge.stats.total == 8
    assert dict(judge.stats.failed) == {"raised ValueError": 1, "NaN": 1, "infinite": 1, "not a number": 1,
                                        "timed out (> 0.3 s)": 1}
    with caplog.at_level(logging.WARNING, logger="dpo_lightning.data"):
        message = warn_failures(judge.stats, judge.spec())
    assert message == (
        f"judge {judge.spec()}: 5 of 8 responses could not be scored (1 NaN, 1 infinite: returned -inf, "
        "1 not a number: returned str 'high', 1 raised ValueError: no digits here, 1 timed out (> 0.3 s)); "
        "they are left out of the pairs"
    )
    assert caplog.text.count("could not be scored") == 1


def test_no_warning_when_every_row_is_scored(caplog):
    judge = FunctionJudge(SORT_REWARD)
    judge.score(["sort: 1 ="], [" 1"])
    with caplog.at_level(logging.WARNING):
        assert warn_failures(judge.stats, judge.spec()) is None
    assert caplog.text == ""


def test_stats_count_over_calls_and_merge_over_ranks():
    """Rank 0: 2 rows, one raising; rank 1: 4 rows, all raising (4 more examples, of which 2 are kept:
    3 per reason) -> 6 rows, 5 failed, 3 examples."""
    judge = FunctionJudge(SORT_REWARD)
    judge.score(["sort: 1 =", "bad"], [" 1", " 1"])
    other = FunctionJudge(SORT_REWARD)
    other.score(["x1", "x2"], ["", ""])
    other.score(["x3", "x4"], ["", ""])
    merged = judge.stats.merge(other.stats)
    assert (merged.scored, merged.n_failed, merged.total) == (1, 5, 6)
    prompts = [e.split("'")[1] for e in merged.examples["raised ValueError"]]  # "not a sort prompt: 'bad' (..."
    assert prompts == ["bad", "x1", "x2"]
    assert judge.reset_stats().total == 2 and judge.stats.total == 0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("dpo_lightning.data.synthetic.sort_reward", "expected 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz' \\(ModuleNotFoundError"),
        ("dpo_lightning.data.synthetic:nope", "has no attribute 'nope'"),
        ("dpo_lightning.data.synthetic:NAMES", "'NAMES' is a tuple, not a function"),
        ("math:sqrt", "must take \\(prompt, response\\)"),
    ],
)
def test_a_bad_function_spec_fails_on_construction_naming_it(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        FunctionJudge(spec)
    assert repr(spec) in str(err.value)


@pytest.mark.parametrize("timeout", [0, -1, math.inf, "2"])
def test_a_bad_timeout_is_refused(timeout):
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        FunctionJudge(SORT_REWARD, timeout_s=timeout)


def test_as_score_takes_numbers_only():
    assert as_score(np.float32(0.5)) == 0.5 and as_score(torch.tensor(2.0)) == 2.0 and as_score(3) == 3.0
    assert as_score(True) == Failure("not a number", "returned bool True")
    assert as_score(None) == Failure("not a number", "returned NoneType None")
    assert as_score(torch.ones(2)).reason == "not a number"
    assert as_score(np.float64("nan")) == Failure("NaN")


def test_misaligned_lists_are_refused():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        FunctionJudge(SORT_REWARD).score(["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------ RewardModelJudge

# Word-level chat template for the sorting vocabulary: the user turn ends with "=", the assistant turn
# with "</s>" (so no EOS is added after it, as for any template).
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} ={% else %}"
    "{{ m['content'] }} </s>{% endif %}{% endfor %}"
)


def _reward_model(tmp_path, rows, chat_template=None):
    """A tiny RewardModule (score head moved off its init), its rewards on the PreferenceDataModule batch
    of ``rows`` (chosen rows first), and the folder it was exported to."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    dm = PreferenceDataModule(tokenizer=tokenizer, dataset=rows, val_split=None, max_length=64)
    rm = RewardModule(model_config=TINY, tokenizer=dm.tokenizer).eval()
    with torch.no_grad():
        rm.model.score.weight.normal_()
    batch = next(iter(dm._loader(dm.splits["train"], len(rows), shuffle=False)))
    with torch.no_grad():
        rewards = rm(batch)  # (2B,)
    export_hf(rm.model, rm.tokenizer, tmp_path / "rm")
    return rewards, tmp_path / "rm"


def test_reward_model_judge_scores_as_the_trained_module(tmp_path):
    """Same rows, same weights: the judge's scores of (prompt, chosen) and (prompt, rejected) equal
    RewardModule(batch) (1e-5), though the judge batches 3 rows at a time, sorted by length."""
    rows = generate_pairs(7, 5)
    rewards, folder = _reward_model(tmp_path, rows)
    judge = RewardModelJudge(str(folder), batch_size=3, device="cpu")
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = judge.score(prompts, responses)
    torch.testing.assert_close(torch.tensor(scores), rewards, rtol=1e-5, atol=1e-5)
    assert judge.spec() == f"reward_model:{folder}" and judge.stats.scored == 14
    assert not judge.model.training


def test_reward_model_judge_renders_message_lists_as_the_data_module(tmp_path):
    """Conversational rows through the chat template: the judge gets the prompt as messages and the
    response as a string (one assistant message), and scores as RewardModule did in training."""
    pairs = generate_pairs(5, 6)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"][:-2]}],  # the template writes the "="
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs]
    rewards, folder = _reward_model(tmp_path, rows, chat_template=TEMPLATE)
    judge = RewardModelJudge(str(folder), batch_size=4)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs]
    torch.testing.assert_close(torch.tensor(judge.score(prompts, responses)), rewards, rtol=1e-5, atol=1e-5)


def test_rows_too_long_or_empty_are_none_with_a_reason(tmp_path):
    """max_length 8. "sort: 3 1 2 =" + " 1 2 3": <s> sort: 3 1 2 = 1 2 3 </s> = 10 tokens > 8 -> None;
    "sort: 5 =" + " 5": <s> sort: 5 = 5 </s> = 6 tokens -> scored; "" has no response token -> None."""
    _, folder = _reward_model(tmp_path, generate_pairs(2, 0))
    judge = RewardModelJudge(str(folder), max_length=8)
    scores = judge.score(["sort: 3 1 2 =", "sort: 5 =", "sort: 5 ="], [" 1 2 3", " 5", ""])
    assert scores[0] is None and isinstance(scores[1], float) and scores[2] is None
    assert judge.stats.examples == {"too long": ["10 tokens > max_length 8"], "empty response": ["no response tokens"]}
    # Without max_length the model's 64 positions are the limit.
    long_prompt = "sort: " + "1 " * 70 + "="
    default = RewardModelJudge(str(folder))
    assert default.score([long_prompt], [" 1"]) == [None]
    assert default.stats.examples["too long"] == ["75 tokens > the model's positions 64"]


def test_reward_model_judge_refuses_what_it_cannot_score_with(tmp_path):
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(**TINY, vocab_size=len(tokenizer), num_labels=2, pad_token_id=3)
    with pytest.raises(ValueError, match="one output \\(num_labels=1\\), this one has 2"):
        RewardModelJudge(AutoModelForSequenceClassification.from_config(config), tokenizer=tokenizer)
    config = AutoConfig.for_model(**TINY, vocab_size=len(tokenizer), num_labels=1, pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id 0 is not the tokenizer's 3"):
        RewardModelJudge(AutoModelForSequenceClassification.from_config(config), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="give the tokenizer"):
        RewardModelJudge(AutoModelForSequenceClassification.from_config(config))
    config = AutoConfig.for_model(**TINY, vocab_size=len(tokenizer), num_labels=1, pad_token_id=3)
    with pytest.raises(ValueError, match="max_length=65 exceeds the model's 64 positions"):
        RewardModelJudge(AutoModelForSequenceClassification.from_config(config), tokenizer=tokenizer, max_length=65)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        RewardModelJudge(str(tmp_path / "missing"))
    judge = RewardModelJudge(AutoModelForSequenceClassification.from_config(config), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no chat_template"):
        judge.score([[{"role": "user", "content": "sort: 1"}]], [" 1"])


# ------------------------------------------------------------------------------------------ resolve_judge


def test_resolve_judge_forms(tmp_path):
    judge = resolve_judge(f"function:{SORT_REWARD}", timeout_s=5)
    assert isinstance(judge, FunctionJudge) and judge.timeout_s == 5 and judge.spec() == f"function:{SORT_REWARD}"
    assert resolve_judge(judge) is judge
    _, folder = _reward_model(tmp_path, generate_pairs(2, 0))
    rm = resolve_judge(f"reward_model:{folder}", batch_size=2)
    assert isinstance(rm, RewardModelJudge) and rm.batch_size == 2 and rm.spec() == f"reward_model:{folder}"


@pytest.mark.parametrize("spec", ["sort_reward", "llm:gpt-4", "function:", "reward_model", "", 42])
def test_resolve_judge_lists_the_forms_for_anything_else(spec):
    with pytest.raises(ValueError, match="expected 'function:package.module:function', "
                                         "'reward_model:<path or hub id>', 'llm_pairwise:<path or hub id>', "
                                         "'llm_score:<path or hub id>', or a Judge instance"):
        resolve_judge(spec)


def test_judge_options_reach_the_judge_and_a_stray_one_is_named(tmp_path):
    """``output.judge_options`` in a generate recipe: passed to the judge's class when it is built; an option
    the class does not take fails when the writer is made (the CLI: before any weights load), naming it."""
    from dpo_lightning.generation.writer import JudgedSamplesWriter

    writer = JudgedSamplesWriter(output_dir=str(tmp_path), judge=f"function:{SORT_REWARD}",
                                 judge_options={"timeout_s": 5})
    assert resolve_judge(writer.judge_spec, **writer.judge_options).timeout_s == 5
    with pytest.raises(ValueError, match="FunctionJudge takes no option 'batch_size'; its options: timeout_s"):
        JudgedSamplesWriter(judge=f"function:{SORT_REWARD}", judge_options={"batch_size": 4})
    _, folder = _reward_model(tmp_path, generate_pairs(2, 0))
    with pytest.raises(ValueError, match="RewardModelJudge takes no option 'timeout_s'; its options: tokenizer, "
                                         "batch_size, device, max_length, dtype"):
        JudgedSamplesWriter(judge=f"reward_model:{folder}", judge_options={"timeout_s": 5})
    with pytest.raises(ValueError, match="apply to a judge given by spec"):
        JudgedSamplesWriter(judge=FunctionJudge(sort_reward), judge_options={"timeout_s": 5})


def test_a_new_kind_of_judge_is_one_subclass():
    class Length(Judge):
        def score_rows(self, prompts, responses):
            return [len(r) if r else Failure("empty") for r in responses]

        def spec(self):
            return "length"

    judge = Length()
    assert judge.score(["p", "p"], ["abc", ""]) == [3.0, None] and dict(judge.stats.failed) == {"empty": 1}
    with pytest.raises(ValueError, match="apply to a judge given by spec"):
        resolve_judge(judge, timeout_s=1)
