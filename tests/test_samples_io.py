"""samples_io: stable prompt ids, a killed writer's partial line, done ids, merging in source order,
pairs that load with PreferenceDataModule, atomic writes."""

from __future__ import annotations

import json
import logging
import os

import pytest

from dpo_lightning import PreferenceDataModule
from dpo_lightning.data.errors import RowRef
from dpo_lightning.data.formats import Layout, to_example
from dpo_lightning.generation.samples_io import (
    SAMPLES_FILE,
    SampleWriter,
    done_prompt_ids,
    merge_parts,
    part_path,
    prompt_id,
    read_samples,
    sample_record,
    write_pairs,
)

SETTINGS = {"model": "tiny", "judge": "function:dpo_lightning.data.synthetic:sort_reward", "seed": 0}


def record(index: int, prompt: str = "sort: 2 1 =", responses=(" 1 2", " 2 1"), scores=(1.0, 0.0)) -> dict:
    return sample_record(prompt, index, list(responses), list(scores), SETTINGS)


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# ------------------------------------------------------------------------------------------ ids


def test_prompt_id_is_the_documented_hash_and_stable():
    """sha256("0\\n" + '"sort: 2 1 ="')[:16] = e9fc3fbb6277d51e (fixed here: a change would orphan every
    earlier run's samples). A message list hashes its JSON with sorted keys; the index separates a
    prompt that occurs twice."""
    assert prompt_id("sort: 2 1 =", 0) == "e9fc3fbb6277d51e"
    assert prompt_id([{"role": "user", "content": "hi"}], 1) == "4848daa6421332c9"
    assert prompt_id([{"content": "hi", "role": "user"}], 1) == "4848daa6421332c9"
    assert prompt_id("sort: 2 1 =", 1) != prompt_id("sort: 2 1 =", 0)
    assert part_path("out", 3).as_posix() == "out/samples.part3.jsonl"


# ------------------------------------------------------------------------------------------ the writer


def test_a_killed_write_is_cut_off_on_reopening(tmp_path, caplog):
    """3 records, then half of a 4th line (a kill mid-write). Reopening removes exactly those bytes and
    says so; the half-written prompt is not done; after writing it again the file has 4 complete lines."""
    path = part_path(tmp_path, 0)
    with SampleWriter(path) as writer:
        for i in range(3):
            writer.write(record(i))
    assert writer.written == 3 and len(lines(path)) == 3
    fourth = json.dumps(record(3)).encode()
    half = fourth[: len(fourth) // 2]
    with open(path, "ab") as f:
        f.write(half)
    assert done_prompt_ids(tmp_path) == {prompt_id("sort: 2 1 =", i) for i in range(3)}
    with caplog.at_level(logging.WARNING, logger="dpo_lightning.generation.samples_io"):
        writer = SampleWriter(path)
    assert writer.truncated == len(half)
    assert f"removed a partial last line ({len(half)} bytes)" in caplog.text
    with writer:
        writer.write(record(3))
    assert [json.loads(line) for line in lines(path)] == [record(i) for i in range(4)]
    assert all(line.endswith(b"\n") for line in lines(path))


def test_a_file_holding_only_a_partial_line_is_emptied(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_bytes(b'{"prompt_id": "ab')
    with SampleWriter(path) as writer:
        assert writer.truncated == 17
    assert path.read_bytes() == b""
    with SampleWriter(path) as writer:  # a complete file is left as it is
        writer.write(record(0))
        size = path.stat().st_size
    with SampleWriter(path) as writer:
        assert writer.truncated == 0 and path.stat().st_size == size


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scores": [1.0]}, "responses and scores must be lists of equal length, got a list of 2 and a list of 1"),
        ({"scores": [1.0, float("nan")]}, "score 1 is nan"),
        ({"prompt_id": ""}, "prompt_id must be a non-empty string"),
        ({"settings": None}, "settings must be an object"),
        ({"responses": [" 1 2", 3]}, "response 1 is a int"),
    ],
)
def test_a_malformed_record_is_refused_before_writing(tmp_path, change, match):
    path = tmp_path / "p.jsonl"
    with SampleWriter(path) as writer, pytest.raises(ValueError, match=match):
        writer.write({**record(0), **change})
    assert path.read_bytes() == b""
    with SampleWriter(path) as writer, pytest.raises(ValueError, match="the record has no settings"):
        writer.write({k: v for k, v in record(0).items() if k != "settings"})


# ------------------------------------------------------------------------------------------ re-runs


def test_done_ids_come_from_every_part_file_and_the_merged_file(tmp_path):
    """Part 0: prompts 0, 1; part 1: prompt 2 and half of prompt 3; samples.jsonl: prompt 4 -> 0, 1, 2, 4."""
    with SampleWriter(part_path(tmp_path, 0)) as w0, SampleWriter(part_path(tmp_path, 1)) as w1:
        w0.write(record(0))
        w0.write(record(1))
        w1.write(record(2))
    with open(part_path(tmp_path, 1), "ab") as f:
        f.write(json.dumps(record(3)).encode()[:20])
    (tmp_path / SAMPLES_FILE).write_text(json.dumps(record(4)) + "\n")
    assert done_prompt_ids(tmp_path) == {prompt_id("sort: 2 1 =", i) for i in (0, 1, 2, 4)}
    assert done_prompt_ids(tmp_path, settings=SETTINGS) == done_prompt_ids(tmp_path)
    with pytest.raises(ValueError, match="made with other settings \\(differing: seed\\); use a new output folder"):
        done_prompt_ids(tmp_path, settings={**SETTINGS, "seed": 1})
    assert done_prompt_ids(tmp_path / "empty") == set()


def test_merge_writes_source_order_once_and_removes_the_parts(tmp_path):
    """Part 0 holds prompts 2, 0; part 1 holds 1 and 0 again, identical (a resumed run). Order 0, 1, 2
    -> 3 lines in that order, prompt 0 once; the part files are gone, and no temporary file is left."""
    ids = [prompt_id("sort: 2 1 =", i) for i in range(3)]
    with SampleWriter(part_path(tmp_path, 0)) as w0, SampleWriter(part_path(tmp_path, 1)) as w1:
        w0.write(record(2))
        w0.write(record(0))
        w1.write(record(1))
        w1.write(record(0))
    merged = merge_parts(tmp_path, ids)
    assert merged == tmp_path / SAMPLES_FILE
    assert [r["prompt_id"] for r in read_samples(merged)] == ids
    assert sorted(os.listdir(tmp_path)) == [SAMPLES_FILE]
    assert done_prompt_ids(tmp_path) == set(ids)
    # Merging again (e.g. a re-run that found everything done) gives the same file.
    before = merged.read_bytes()
    assert merge_parts(tmp_path, ids).read_bytes() == before


def test_merge_refuses_conflicts_missing_and_foreign_records_and_changes_nothing(tmp_path):
    ids = [prompt_id("sort: 2 1 =", i) for i in range(2)]
    with SampleWriter(part_path(tmp_path, 0)) as w0, SampleWriter(part_path(tmp_path, 1)) as w1:
        w0.write(record(0))
        w0.write(record(1))
        w1.write(record(0, scores=(0.5, 0.0)))  # the same prompt, another score
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=f"prompt {ids[0]}: .*samples.part0.jsonl:1 and .*samples.part1.jsonl:1 "
                                         "hold different records"):
        merge_parts(tmp_path, ids)
    assert sorted(os.listdir(tmp_path)) == listing
    part_path(tmp_path, 1).unlink()
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="1 of 3 prompts have no record"):
        merge_parts(tmp_path, [*ids, prompt_id("sort: 2 1 =", 2)])
    with pytest.raises(ValueError, match="1 record\\(s\\) are of prompts not in this run's prompts"):
        merge_parts(tmp_path, ids[:1])
    with pytest.raises(ValueError, match="occur more than once in order"):
        merge_parts(tmp_path, [ids[0], ids[0], ids[1]])
    assert sorted(os.listdir(tmp_path)) == listing


def test_a_temporary_file_of_a_killed_merge_is_removed(tmp_path):
    with SampleWriter(part_path(tmp_path, 0)) as writer:
        writer.write(record(0))
    (tmp_path / f".{SAMPLES_FILE}.x1y2.tmp").write_text("half")
    merge_parts(tmp_path, [prompt_id("sort: 2 1 =", 0)])
    assert sorted(os.listdir(tmp_path)) == [SAMPLES_FILE]


# ------------------------------------------------------------------------------------------ pairs


def _samples(tmp_path):
    """Prompt A "sort: 2 1 =": [" 1 2", " 2 1", " 1 2", " 1"], sort_reward [1.0, 0.0, 1.0, 0.5] (" 1" matches
    1 of 2 positions). Prompt B "sort: 3 1 2 =": [" 1 2 3", " 1 3 2", " x"], scores [1.0, 1/3, None]."""
    with SampleWriter(part_path(tmp_path, 0)) as writer:
        writer.write(record(0, "sort: 2 1 =", [" 1 2", " 2 1", " 1 2", " 1"], [1.0, 0.0, 1.0, 0.5]))
        writer.write(record(1, "sort: 3 1 2 =", [" 1 2 3", " 1 3 2", " x"], [1.0, 1 / 3, None]))
    return merge_parts(tmp_path, [prompt_id("sort: 2 1 =", 0), prompt_id("sort: 3 1 2 =", 1)])


def test_pairs_best_vs_worst_by_hand_and_they_load_as_preference_data(tmp_path, caplog):
    """best_vs_worst: A -> (0, 1): " 1 2" over " 2 1", 1.0 vs 0.0; B -> (0, 1): 1.0 vs 1/3. B's " x" is
    unscored: counted in the warning."""
    samples = _samples(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dpo_lightning.data"):
        totals = write_pairs(samples, tmp_path / "pairs" / "pairs.jsonl", "best_vs_worst")
    rows = [json.loads(line) for line in lines(tmp_path / "pairs" / "pairs.jsonl")]
    assert rows == [
        {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1", "score_chosen": 1.0, "score_rejected": 0.0,
         "prompt_id": prompt_id("sort: 2 1 =", 0)},
        {"prompt": "sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 1 3 2", "score_chosen": 1.0,
         "score_rejected": 1 / 3, "prompt_id": prompt_id("sort: 3 1 2 =", 1)},
    ]
    assert (totals.prompts, totals.responses, totals.pairs, totals.unscored) == (2, 7, 2, 1)
    assert "2 prompts, 7 responses -> 2 pairs (strategy 'best_vs_worst', min_margin 0); left out: 1 unscored" \
        in caplog.text
    dm = PreferenceDataModule(tokenizer="synthetic:sort", dataset=str(tmp_path / "pairs" / "pairs.jsonl"),
                              val_split=None, max_length=64, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert len(dm.splits["train"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4


def test_pairs_are_rederived_with_another_strategy_without_generating(tmp_path):
    """all: A -> (0,1), (0,3), (2,1), (2,3), (3,1) and the tie (0,2) (the same text, 1.0 each) left out;
    B -> (0,1). 6 pairs, 1 tie, 1 unscored. With min_margin 0.6: A keeps (0,1), (2,1) (1.0 - 0.5 and
    0.5 - 0.0 are below), B keeps (0,1) (1 - 1/3 = 0.67) -> 3 pairs, 3 below the margin."""
    samples = _samples(tmp_path)
    totals = write_pairs(samples, tmp_path / "all.jsonl", "all")
    rows = [json.loads(line) for line in lines(tmp_path / "all.jsonl")]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        (" 1 2", " 2 1"), (" 1 2", " 1"), (" 1 2", " 2 1"), (" 1 2", " 1"), (" 1", " 2 1"), (" 1 2 3", " 1 3 2")
    ]
    assert (totals.pairs, totals.ties, totals.unscored, totals.below_margin) == (6, 1, 1, 0)
    margin = write_pairs(samples, tmp_path / "margin.jsonl", "all", min_margin=0.6)
    assert (margin.pairs, margin.below_margin) == (3, 3)
    assert len(lines(tmp_path / "margin.jsonl")) == 3


def test_conversational_prompts_give_assistant_message_sides(tmp_path):
    prompt = [{"role": "user", "content": "sort: 2 1"}]
    with SampleWriter(tmp_path / SAMPLES_FILE) as writer:
        writer.write(sample_record(prompt, 0, ["1 2", "2 1"], [1.0, 0.0], SETTINGS))
    write_pairs(tmp_path / SAMPLES_FILE, tmp_path / "pairs.jsonl", "all")
    (row,) = [json.loads(line) for line in lines(tmp_path / "pairs.jsonl")]
    assert row["chosen"] == [{"role": "assistant", "content": "1 2"}]
    assert row["rejected"] == [{"role": "assistant", "content": "2 1"}]
    pair = {k: row[k] for k in ("prompt", "chosen", "rejected")}
    assert to_example(pair, Layout.EXPLICIT_PROMPT, RowRef("t", "train", 0)).conversational


def test_a_failed_pairs_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    samples = _samples(tmp_path)
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    listing = sorted(os.listdir(tmp_path))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(samples, out, "all")
    assert out.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == listing
    with pytest.raises(ValueError, match="unknown pairing strategy"):
        write_pairs(samples, out, "best")  # refused before reading or writing


def test_empty_responses_are_left_out_of_pairs_and_counted(tmp_path):
    """Scores [1.0, 0.0, 0.5] with response 1 empty: best_vs_worst pairs 0 (1.0) with 2 (0.5), not with
    the empty one (0.0); the summary counts 1 empty response."""
    from dpo_lightning.generation.samples_io import SampleWriter, merge_parts, part_path, prompt_id, write_pairs

    pid = prompt_id("sort: 2 1 =", 0)
    with SampleWriter(part_path(tmp_path, 0)) as writer:
        writer.write({"prompt_id": pid, "prompt": "sort: 2 1 =", "responses": [" 1 2", "", " 2 1"],
                      "scores": [1.0, 0.0, 0.5], "settings": {}})
    samples = merge_parts(tmp_path, [pid])
    totals = write_pairs(samples, tmp_path / "pairs.jsonl", "best_vs_worst")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(" 1 2", " 2 1")]
    assert totals.empty == 1 and totals.unscored == 0 and "1 empty response" in totals.summary("best_vs_worst")
