"""The bundled sort task: determinism, ground truth, split disjointness and the tokenizer contract."""

import pytest

from dpo_lightning.data.synthetic import (
    NAMES,
    build_tokenizer,
    generate_pairs,
    load_dataset,
    sort_exact,
    sort_reward,
    sort_solved,
)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("synthetic:sort", seed=0, num_train=300, num_val=100)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("synthetic:sort")


def _digits(text):
    return [int(w) for w in text.split()]


def test_same_seed_same_rows_different_seed_different_rows():
    assert generate_pairs(50, seed=3) == generate_pairs(50, seed=3)
    assert generate_pairs(50, seed=3) != generate_pairs(50, seed=4)
    a, b = load_dataset(seed=1, num_train=40, num_val=20), load_dataset(seed=1, num_train=40, num_val=20)
    for split in ("train", "validation"):
        assert a[split].to_list() == b[split].to_list()
    assert load_dataset(seed=2, num_train=40, num_val=20)["train"].to_list() != a["train"].to_list()


def test_validation_split_does_not_depend_on_train_size():
    small = load_dataset(seed=0, num_train=10, num_val=30)["validation"]
    large = load_dataset(seed=0, num_train=500, num_val=30)["validation"]
    assert small.to_list() == large.to_list()


def test_schema_and_sizes(dataset):
    assert set(dataset) == {"train", "validation"}
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (300, 100)
    for split in dataset.values():
        assert split.column_names == ["prompt", "chosen", "rejected"]
        assert all(split.features[c].dtype == "string" for c in split.column_names)


def test_chosen_is_the_sort_and_rejected_a_same_length_near_miss(dataset):
    for split in dataset.values():
        for row in split:
            prompt = row["prompt"].split()
            assert prompt[0] == "sort:" and prompt[-1] == "=" and 3 <= len(prompt) - 2 <= 8
            digits = [int(w) for w in prompt[1:-1]]
            chosen, rejected = _digits(row["chosen"]), _digits(row["rejected"])
            assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
            assert chosen == sorted(digits)
            assert rejected != chosen and len(rejected) == len(chosen)
            swapped = sorted(rejected) == chosen and sum(r != c for r, c in zip(rejected, chosen)) == 2
            replaced = sum(r != c for r, c in zip(rejected, chosen)) == 1 and not set(rejected) <= set(digits)
            assert swapped or replaced, row


def test_both_near_miss_kinds_occur():
    rows = generate_pairs(200, seed=0)
    swaps = sum(sorted(_digits(r["rejected"])) == _digits(r["chosen"]) for r in rows)
    assert 50 < swaps < 150
    only_swaps = generate_pairs(50, seed=0, kinds=("swap",))
    for row in only_swaps:
        if len(set(row["chosen"].split())) > 1:
            assert sorted(_digits(row["rejected"])) == _digits(row["chosen"])


def test_reward_ranks_every_pair(dataset):
    for split in dataset.values():
        for row in split:
            assert sort_reward(row["prompt"], row["chosen"]) == 1.0
            assert sort_reward(row["prompt"], row["rejected"]) < 1.0


def test_reward_hand_values():
    """Target for "sort: 3 1 4 1 5 =" is 1 1 3 4 5; partial credit = matching positions / longer length."""
    prompt = "sort: 3 1 4 1 5 ="
    assert sort_reward(prompt, " 1 1 3 4 5") == 1.0
    assert sort_reward(prompt, "1 1 3 4 5") == 1.0  # whitespace does not matter
    assert sort_reward(prompt, " 1 1 4 3 5") == pytest.approx(3 / 5)
    assert sort_reward(prompt, " 1 1 3 4") == pytest.approx(4 / 5)
    assert sort_reward(prompt, " 1 1 3 4 5 5") == pytest.approx(5 / 6)
    assert sort_reward(prompt, " x") == 0.0
    assert sort_reward(prompt, "") == 0.0
    with pytest.raises(ValueError, match="not a sort prompt"):
        sort_reward("3 1 4", " 1 3 4")


def test_exact_and_solved_pass_only_the_sort():
    """sort_exact / sort_solved: the pass/fail check (no partial credit); every chosen answer passes and
    every near miss fails, which is where sort_reward gives 1.0 and < 1.0."""
    prompt = "sort: 3 1 4 1 5 ="
    for response, right in [(" 1 1 3 4 5", True), ("1 1 3 4 5 ", True), (" 1 1 4 3 5", False),
                            (" 1 1 3 4", False), (" 1 1 3 4 5 5", False), ("1,1,3,4,5", False), ("", False)]:
        assert sort_exact(prompt, response) is right, response
        assert sort_solved(prompt, response) == (1.0 if right else 0.0), response
    with pytest.raises(ValueError, match="not a sort prompt"):
        sort_solved("3 1 4", " 1 3 4")
    for row in generate_pairs(200, 3):
        assert sort_exact(row["prompt"], row["chosen"]) and not sort_exact(row["prompt"], row["rejected"])


def test_train_and_validation_prompts_are_disjoint_and_unique(dataset):
    train, val = dataset["train"]["prompt"], dataset["validation"]["prompt"]
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)


def test_tokenizer_special_tokens_and_bos(tokenizer):
    assert len(tokenizer) == 16
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer("sort: 3 1 =").input_ids == [1, 4, 9, 7, 5]
    assert tokenizer("sort: 3 1 =", add_special_tokens=False).input_ids == [4, 9, 7, 5]
    assert tokenizer.unk_token_id not in tokenizer("sort: 0 1 2 3 4 5 6 7 8 9 =").input_ids


def test_tokenizer_round_trip_and_concatenation(dataset, tokenizer):
    for row in dataset["validation"]:
        prompt_ids = tokenizer(row["prompt"]).input_ids
        for response in (row["chosen"], row["rejected"]):
            response_ids = tokenizer(response, add_special_tokens=False).input_ids
            assert tokenizer(row["prompt"] + response).input_ids == prompt_ids + response_ids
            assert tokenizer.decode(response_ids).split() == response.split()
            assert tokenizer.unk_token_id not in response_ids


def test_tokenizer_save_and_load(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "sort: 9 0 4 = 0 4 9"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.get_vocab() == tokenizer.get_vocab()
    specials = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")


@pytest.mark.parametrize("call", [build_tokenizer, load_dataset])
def test_unknown_name_lists_valid_ones(call):
    with pytest.raises(ValueError, match="synthetic:sort") as info:
        call("synthetic:nope")
    assert "synthetic:nope" in str(info.value)
    assert NAMES == ("synthetic:sort",)


def test_bad_generation_arguments():
    with pytest.raises(ValueError, match="kinds"):
        generate_pairs(5, seed=0, kinds=("drop",))
    with pytest.raises(ValueError, match="distinct prompts"):
        generate_pairs(200, seed=0, min_len=2, max_len=2)  # only 100 two-digit prompts exist
