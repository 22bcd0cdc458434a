"""`PreferenceDataModule` end to end: sources -> batches, splits, loaders, config surface, bad data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dpo_lightning.data import DataError, PreferenceDataModule, load_tokenizer

HH_TEST = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def make(tokenizer, dataset, **kwargs) -> PreferenceDataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    dm = PreferenceDataModule(tokenizer, dataset, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_from_a_jsonl_file(bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    path = rows_writer("pairs.jsonl", standard_rows)
    dm = make(bpe_tokenizer, str(path), batch_size=3, cache_dir=cache_dir)
    assert dm.hparams.dataset == str(path) and "tokenizer" not in dm.hparams  # objects are not hparams
    assert dm.pad_token_id == bpe_tokenizer.eos_token_id and dm.vocab_size == len(bpe_tokenizer)
    assert dm.splits["train"].column_names == [
        "chosen_input_ids",
        "chosen_response_start",
        "rejected_input_ids",
        "rejected_response_start",
    ]
    assert len(dm.splits["train"]) == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].dtype == torch.long
    # Rows 0..B-1 are chosen, B..2B-1 the rejected of the same pairs: same prompt, different response.
    for i in range(3):
        chosen, rejected = batch["input_ids"][i], batch["input_ids"][i + 3]
        prompt_len = int((batch["labels"][i] == -100).long().argmin())
        assert torch.equal(chosen[:prompt_len], rejected[:prompt_len])
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_shuffling_is_seeded(bpe_tokenizer, standard_rows):
    def first_batches(seed: int) -> list[torch.Tensor]:
        dm = make(bpe_tokenizer, standard_rows, batch_size=2, seed=seed, drop_identical=False)
        return [b["input_ids"] for b in dm.train_dataloader()]

    same = first_batches(0), first_batches(0)
    assert all(torch.equal(a, b) for a, b in zip(*same))
    other = first_batches(1)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(same[0], other))


def test_val_fraction_is_a_fixed_split(bpe_tokenizer, words):
    rows = [{"prompt": f"{w}?", "chosen": " yes", "rejected": f" {w}"} for w in words[:40]]
    splits = [make(bpe_tokenizer, rows, val_fraction=0.25, seed=5).splits for _ in range(2)]
    assert len(splits[0]["train"]) == 30 and len(splits[0]["validation"]) == 10
    assert splits[0]["validation"]["chosen_input_ids"] == splits[1]["validation"]["chosen_input_ids"]
    dm = make(bpe_tokenizer, rows, val_fraction=0.25, eval_batch_size=4)
    assert [b["input_ids"].shape[0] for b in dm.val_dataloader()] == [8, 8, 4]


def test_named_splits_and_test_split(bpe_tokenizer, tmp_path, standard_rows):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    parts = {"train": standard_rows[:6], "validation": standard_rows[6:], "test": standard_rows[:2]}
    DatasetDict({k: Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(str(folder))
    dm = make(bpe_tokenizer, str(folder), test_split="test")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "validation": 2, "test": 2}
    assert len(dm.val_dataloader()) == 1 and len(dm.test_dataloader()) == 1
    assert (
        PreferenceDataModule(bpe_tokenizer, str(folder), val_split="dev").setup() is None
    )  # logged, not fatal
    with pytest.raises(
        DataError, match=r"saved: no split 'dev' \(available: \['test', 'train', 'validation'\]\)"
    ):
        make(bpe_tokenizer, str(folder), train_split="dev")


def test_conversational_rows_with_chat_template(chat_tokenizer, rows_writer, cache_dir):
    rows = [
        {
            "prompt": [{"role": "system", "content": "be good"}, {"role": "user", "content": f"hello {i}"}],
            "chosen": [{"role": "assistant", "content": "fine"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
        for i in range(4)
    ]
    dm = make(chat_tokenizer, str(rows_writer("conv.jsonl", rows)), cache_dir=cache_dir)
    batch = dm.collate_fn([dm.splits["train"][0]])
    assert chat_tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]) == "fine<|end|>\n"
    assert chat_tokenizer.decode(batch["labels"][1][batch["labels"][1] != -100]) == "bad<|end|>\n"


def test_implicit_prompt_hh_rows(bpe_tokenizer, rows_writer, cache_dir):
    prompt = "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: how are you?\n\nAssistant:"
    rows = [{"chosen": prompt + " I am fine.", "rejected": prompt + " I am bad."}] * 3
    dm = make(bpe_tokenizer, str(rows_writer("hh.jsonl.gz", rows)), max_length=128, cache_dir=cache_dir)
    side = dm.splits["train"][0]
    start = side["chosen_response_start"]
    assert bpe_tokenizer.decode(side["chosen_input_ids"][:start]) == prompt
    assert bpe_tokenizer.decode(side["chosen_input_ids"][start:]) == " I am fine.<|endoftext|>"


@pytest.mark.skipif(not HH_TEST.exists(), reason="../shared/data is not present")
def test_hh_harmless_test_split_loads(bpe_tokenizer, cache_dir):
    dm = make(bpe_tokenizer, str(HH_TEST), max_length=4096, max_prompt_length=4000, cache_dir=cache_dir)
    train = dm.splits["train"]
    assert len(train) == 2312
    ids, start = train[86]["chosen_input_ids"], train[86]["chosen_response_start"]
    assert bpe_tokenizer.decode(ids[start:]) == " <|endoftext|>"  # a whitespace-only HH response
    assert bpe_tokenizer.decode(ids[:start]).endswith("\n\nAssistant:")


def test_workers_and_num_proc(bpe_tokenizer, rows_writer, words, cache_dir):
    rows = [{"prompt": f"{w}?", "chosen": " yes", "rejected": f" {w}!"} for w in words]
    dm = make(
        bpe_tokenizer,
        str(rows_writer("p.jsonl", rows)),
        num_proc=2,
        num_workers=2,
        batch_size=16,
        cache_dir=cache_dir,
    )
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == 2 * len(rows)


def test_preprocessing_is_cached_by_fingerprint(
    tmp_path, bpe_tokenizer, rows_writer, standard_rows, cache_dir
):
    """A second module with a reloaded tokenizer and the same settings reuses the cached map."""
    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    path = str(rows_writer("pairs.jsonl", standard_rows))
    first = make(str(tmp_path / "tok"), path, cache_dir=cache_dir).splits["train"]
    second = make(str(tmp_path / "tok"), path, cache_dir=cache_dir).splits["train"]
    other = make(str(tmp_path / "tok"), path, cache_dir=cache_dir, max_length=40).splits["train"]
    assert first.cache_files and first.cache_files == second.cache_files
    assert first._fingerprint == second._fingerprint != other._fingerprint


def test_config_surface_through_jsonargparse(tmp_path, bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    from jsonargparse import ArgumentParser

    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    path = rows_writer("pairs.parquet", standard_rows)
    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    assert "Fraction of the train split held out" in parser.format_help()
    cfg = parser.parse_args(
        [
            f"--data.tokenizer={tmp_path / 'tok'}",
            f"--data.dataset={path}",
            "--data.max_length=48",
            "--data.truncation_mode=keep_start",
            f"--data.cache_dir={cache_dir}",
        ]
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, PreferenceDataModule) and dm.hparams.truncation_mode == "keep_start"
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8


def test_load_tokenizer_adds_pad_and_keeps_remote_code_off(monkeypatch, bpe_tokenizer, caplog):
    seen = {}

    def from_pretrained(spec, **kwargs):
        seen.update(kwargs)
        return bpe_tokenizer

    monkeypatch.setattr("dpo_lightning.data.tokenizer.AutoTokenizer.from_pretrained", from_pretrained)
    with caplog.at_level(logging.INFO, logger="dpo_lightning.data.tokenizer"):
        tokenizer = load_tokenizer("some/model")
    assert seen == {"trust_remote_code": False}
    assert tokenizer.pad_token == "<|endoftext|>" and "no pad token" in caplog.text
    load_tokenizer("some/model", trust_remote_code=True)
    assert seen == {"trust_remote_code": True}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"max_length": 1}, "max_length"),
        ({"truncation_mode": "middle"}, "truncation_mode"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"collator": "packed"}, "unknown collator"),
    ],
)
def test_bad_settings(bpe_tokenizer, standard_rows, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        PreferenceDataModule(bpe_tokenizer, standard_rows, **{"max_length": 64, **kwargs})


# -- bad data: a DataError before training, naming source, row and field -----------------------------


def test_missing_column(bpe_tokenizer, rows_writer, cache_dir):
    path = rows_writer("nochosen.csv", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(
        DataError, match=r"nochosen\.csv \(split 'train'\).*missing column\(s\) \['rejected'\]"
    ):
        make(bpe_tokenizer, str(path), cache_dir=cache_dir)


def test_wrong_type_and_empty_value_name_the_row(bpe_tokenizer, rows_writer, standard_rows, cache_dir):
    rows = [*standard_rows, {"prompt": "p", "chosen": 5, "rejected": "r"}]
    path = rows_writer("typed.jsonl", rows)
    with pytest.raises(DataError, match=r"typed\.jsonl, line 9, row 8, field 'chosen': .*got int"):
        make(bpe_tokenizer, str(path), cache_dir=cache_dir)
    path = rows_writer("empty.csv", [*standard_rows, {"prompt": "p", "chosen": "c", "rejected": ""}])
    with pytest.raises(DataError, match=r"empty\.csv \(split 'train'\), row 8, field 'rejected': is empty"):
        make(bpe_tokenizer, str(path), cache_dir=cache_dir)


def test_conversation_without_chat_template(bpe_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    ]
    with pytest.raises(
        DataError, match=r"<list of 1 rows> \(split 'train'\), row 0, field 'prompt'.*no chat_template"
    ):
        make(bpe_tokenizer, rows)


def test_roles_out_of_order(chat_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    ]
    with pytest.raises(
        DataError, match=r"row 0, field 'chosen': roles out of order: message 1 has role 'user'"
    ):
        make(chat_tokenizer, rows)


def test_identical_pairs_are_counted_once(bpe_tokenizer, standard_rows, caplog):
    rows = standard_rows + [{"prompt": "p", "chosen": " same", "rejected": " same"}] * 3
    with caplog.at_level(logging.WARNING):
        dm = make(bpe_tokenizer, rows)
    lines = [r.getMessage() for r in caplog.records if "chosen equals rejected" in r.getMessage()]
    assert len(dm.splits["train"]) == 8 and len(lines) == 1 and "dropped 3 of 11 pairs" in lines[0]
    assert len(make(bpe_tokenizer, rows, drop_identical=False).splits["train"]) == 11


def test_empty_dataset_after_filtering(bpe_tokenizer):
    rows = [{"prompt": "p", "chosen": " same", "rejected": " same"}] * 2
    with pytest.raises(
        DataError, match=r"<list of 2 rows> \(split 'train'\): no pairs left after filtering 2 rows"
    ):
        make(bpe_tokenizer, rows)


def test_unpaired_rows_are_refused_clearly(bpe_tokenizer, rows_writer, cache_dir):
    path = rows_writer("kto.jsonl", [{"prompt": "p", "completion": " c", "label": True}])
    with pytest.raises(DataError, match=r"kto\.jsonl.*label.*need KTO \(KTOModule with KTODataModule\)"):
        make(bpe_tokenizer, str(path), cache_dir=cache_dir)


def test_synthetic_task_end_to_end():
    """The bundled task (another module) through the one tokenizer and one dataset entry point."""
    pytest.importorskip("dpo_lightning.data.synthetic")
    dm = make("synthetic:sort", "synthetic:sort", batch_size=4)
    assert dm.hparams.tokenizer == "synthetic:sort" and len(dm.splits["validation"]) > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] != -100).any(dim=1).all()


def test_lightning_fit_without_validation(bpe_tokenizer, standard_rows):
    """The loaders plug into a Trainer; no validation split means the loop is skipped, not an error."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab_size, 2)
            self.seen: list[tuple[int, int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch["input_ids"].shape))
            return self.embedding(batch["input_ids"]).mean()

        def validation_step(self, batch, batch_idx):
            raise AssertionError("no validation data was configured")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = PreferenceDataModule(bpe_tokenizer, standard_rows, batch_size=4, max_length=64)
    model = Probe(dm.vocab_size)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert [shape[0] for shape in model.seen] == [8, 8]
