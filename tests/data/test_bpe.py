"""The bpe:<size>:<dataset> tokenizer spec: trained on the data, deterministic, lossless."""

import json

import pytest

from dpo_lightning.data import load_tokenizer

ROWS = [
    {"chosen": f"\n\nHuman: how do I bake bread {i}?\n\nAssistant: Mix flour and water.",
     "rejected": f"\n\nHuman: how do I bake bread {i}?\n\nAssistant: No idea, sorry."}
    for i in range(40)
]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return str(path)


def test_trains_on_the_data_and_round_trips(source):
    tok = load_tokenizer(f"bpe:300:{source}")
    assert 256 < len(tok) <= 300  # byte alphabet + merges learnt from the rows
    text = ROWS[3]["chosen"] + " ünïcode ✓"  # bytes never seen still encode (byte-level)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    # merges were learnt: the frequent phrase takes far fewer tokens than bytes
    assert len(tok("\n\nAssistant: Mix flour").input_ids) < len("\n\nAssistant: Mix flour") / 2


def test_deterministic(source):
    assert load_tokenizer(f"bpe:300:{source}").get_vocab() == load_tokenizer(f"bpe:300:{source}").get_vocab()


def test_bad_spec():
    with pytest.raises(ValueError, match="bpe:<vocab size>:<dataset>"):
        load_tokenizer("bpe:many:/nowhere.jsonl")
