"""Row formats -> `PreferenceExample`: layouts, implicit prompts, and the errors for bad rows."""

from __future__ import annotations

import pytest

from dpo_lightning.data import DataError, Layout, PreferenceExample, UnpairedExample, detect_layout, to_example
from dpo_lightning.data.errors import RowRef
from dpo_lightning.data.formats import split_implicit_messages, split_implicit_text

REF = RowRef("rows.jsonl", "train", 7)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("columns", "layout"),
    [
        (["prompt", "chosen", "rejected"], Layout.EXPLICIT_PROMPT),
        (["prompt", "chosen", "rejected", "score_chosen", "id"], Layout.EXPLICIT_PROMPT),
        (["chosen", "rejected"], Layout.IMPLICIT_PROMPT),
        (["prompt", "completion", "label"], Layout.UNPAIRED),
    ],
)
def test_detect_layout(columns, layout):
    assert detect_layout(columns, "src") is layout


def test_missing_columns_named():
    with pytest.raises(DataError, match=r"my\.csv.*'chosen'.*missing column\(s\) \['rejected'\]"):
        detect_layout(["prompt", "chosen"], "my.csv")


def test_standard_row():
    row = {"prompt": "Q: hi", "chosen": " A", "rejected": " B"}
    example = to_example(row, Layout.EXPLICIT_PROMPT, REF)
    assert example == PreferenceExample("Q: hi", " A", " B")
    assert not example.conversational and not example.identical


def test_conversational_row_drops_absent_struct_keys():
    # Arrow gives every message the union of keys; absent ones come back as None.
    row = {
        "prompt": [{"role": "system", "content": "be nice", "name": None}, {**user("hi"), "name": None}],
        "chosen": [{**bot("hello"), "name": None}],
        "rejected": [{**bot("go away"), "name": None}],
    }
    example = to_example(row, Layout.EXPLICIT_PROMPT, REF)
    assert example.conversational
    assert example.prompt == [{"role": "system", "content": "be nice"}, user("hi")]
    assert example.chosen == [bot("hello")]


def test_hh_prompt_is_cut_back_to_the_assistant_marker():
    """Both responses start with " I": the character prefix runs into them; the prompt must not."""
    prompt = "\n\nHuman: how are you?\n\nAssistant: fine\n\nHuman: and today?\n\nAssistant:"
    row = {"chosen": prompt + " I am good.", "rejected": prompt + " I hate you."}
    example = to_example(row, Layout.IMPLICIT_PROMPT, REF)
    assert example == PreferenceExample(prompt, " I am good.", " I hate you.")


def test_hh_one_response_extends_the_other():
    prompt = "\n\nHuman: hello\n\nAssistant:"
    example = to_example(
        {"chosen": prompt + " Sure", "rejected": prompt + " Sure, no"}, Layout.IMPLICIT_PROMPT, REF
    )
    assert example == PreferenceExample(prompt, " Sure", " Sure, no")


def test_hh_whitespace_only_response_is_kept():
    """Four rows of the HH harmless test split have a chosen response of a single space."""
    prompt = "\n\nHuman: hello\n\nAssistant:"
    example = to_example({"chosen": prompt + " ", "rejected": prompt + " Ok"}, Layout.IMPLICIT_PROMPT, REF)
    assert example == PreferenceExample(prompt, " ", " Ok")


def test_implicit_text_without_marker_cuts_at_whitespace():
    assert split_implicit_text("Q: 2+2?\nA: yes four", "Q: 2+2?\nA: yeah") == (
        "Q: 2+2?\nA:",
        " yes four",
        " yeah",
    )


def test_implicit_conversation_prompt_is_message_prefix():
    shared = [user("hi"), bot("hello"), user("joke?")]
    chosen, rejected = [*shared, bot("knock knock")], [*shared, bot("no")]
    example = to_example({"chosen": chosen, "rejected": rejected}, Layout.IMPLICIT_PROMPT, REF)
    assert example == PreferenceExample(shared, [bot("knock knock")], [bot("no")])


def test_implicit_conversation_shared_assistant_turn_stays_in_response():
    chosen = [user("hi"), bot("hello"), user("more"), bot("a")]
    rejected = [user("hi"), bot("hello")]
    prompt, c, r = split_implicit_messages(chosen, rejected)
    assert prompt == [user("hi")] and c == chosen[1:] and r == rejected[1:]


def test_identical_pair_is_flagged():
    assert to_example(
        {"prompt": "p", "chosen": " x", "rejected": " x"}, Layout.EXPLICIT_PROMPT, REF
    ).identical


# -- bad rows: every message names the source, the row and the field --------------------------------

WHERE = r"rows\.jsonl \(split 'train'\), row 7, field "


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "c", "rejected": 5}, "rejected", "got int"),
        ({"prompt": 1.5, "chosen": "c", "rejected": "r"}, "prompt", "got float"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "is empty"),
        ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "is empty"),
        ({"prompt": "p", "chosen": [bot("c")], "rejected": "r"}, "chosen", "expected a string"),
        (
            {"prompt": [user("p")], "chosen": "c", "rejected": [bot("r")]},
            "chosen",
            "expected a list of messages",
        ),
        ({"prompt": [user("p")], "chosen": [], "rejected": [bot("r")]}, "rejected|chosen", "empty"),
        ({"prompt": [user("p")], "chosen": [bot("c")], "rejected": ["r"]}, "rejected", "message 0 is a str"),
        (
            {"prompt": [{"role": "robot", "content": "p"}], "chosen": [bot("c")], "rejected": [bot("r")]},
            "prompt",
            "role 'robot'",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": [bot("c")], "rejected": [bot("r")]},
            "prompt",
            "content of type",
        ),
        (
            {"prompt": [bot("p")], "chosen": [bot("c")], "rejected": [bot("r")]},
            "chosen",
            "roles out of order",
        ),
        (
            {"prompt": [user("p")], "chosen": [user("c")], "rejected": [bot("r")]},
            "chosen",
            "opens with a user message, so it should repeat 'prompt' before the response, but message 0 is "
            "user: 'c' where 'prompt' has user: 'p'",
        ),
        (
            {
                "prompt": [user("p"), {"role": "system", "content": "s"}],
                "chosen": [bot("c")],
                "rejected": [bot("r")],
            },
            "chosen",
            "roles out of order: message 1 has role 'system'",
        ),
    ],
)
def test_bad_explicit_rows(row, field, problem):
    with pytest.raises(DataError, match=WHERE + f"'({field})'.*{problem}"):
        to_example(row, Layout.EXPLICIT_PROMPT, REF)


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"chosen": "", "rejected": "x"}, "chosen", "is empty"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "chosen",
            "empty",
        ),
        ({"chosen": [user("a"), bot("b")], "rejected": "x"}, "rejected", "same kind"),
        (
            {"chosen": [user("a"), bot("b")], "rejected": [bot("b"), user("a")]},
            "rejected",
            "roles out of order",
        ),
        ({"chosen": [user("a"), bot("b")], "rejected": [user("c"), bot("b")]}, "chosen", "no common prompt"),
    ],
)
def test_bad_implicit_rows(row, field, problem):
    with pytest.raises(DataError, match=WHERE + f"'{field}'.*{problem}"):
        to_example(row, Layout.IMPLICIT_PROMPT, REF)


# -- chosen / rejected that repeat the prompt (UltraFeedback binarized) --------------------------------


def test_string_prompt_repeated_as_user_turn():
    """HuggingFaceH4/ultrafeedback_binarized: the string prompt is the user turn both sides open with."""
    row = {"prompt": "what is two plus four?", "chosen": [user("what is two plus four?"), bot("six")],
           "rejected": [user("what is two plus four?"), bot("nine")]}  # fmt: skip
    example = to_example(row, Layout.EXPLICIT_PROMPT, REF)
    assert example == PreferenceExample([user("what is two plus four?")], [bot("six")], [bot("nine")])
    assert example.conversational


def test_string_prompt_multi_turn_and_system():
    """The prompt is the sides' shared conversation; `prompt` may be its first user turn or its last."""
    shared = [{"role": "system", "content": "be brief"}, user("hi"), bot("hello"), user("joke?")]
    for prompt in ("hi", "joke?"):
        row = {"prompt": prompt, "chosen": [*shared, bot("knock knock")], "rejected": [*shared, bot("no")]}
        assert to_example(row, Layout.EXPLICIT_PROMPT, REF) == PreferenceExample(
            shared, [bot("knock knock")], [bot("no")]
        )


def test_string_prompt_identical_sides_are_flagged():
    side = [user("p"), bot("same")]
    example = to_example({"prompt": "p", "chosen": side, "rejected": list(side)}, Layout.EXPLICIT_PROMPT, REF)
    assert example.identical and example.prompt == [user("p")]


def test_message_prompt_repeated_by_the_sides():
    prompt = [{"role": "system", "content": "be brief"}, user("hi")]
    row = {"prompt": prompt, "chosen": [*prompt, bot("hello")], "rejected": [*prompt, bot("go away")]}
    assert to_example(row, Layout.EXPLICIT_PROMPT, REF) == PreferenceExample(prompt, [bot("hello")], [bot("go away")])
    # Arrow's absent struct keys (None) do not make the repeat differ.
    row["chosen"] = [{**m, "name": None} for m in row["chosen"]]
    assert to_example(row, Layout.EXPLICIT_PROMPT, REF).chosen == [bot("hello")]


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        (
            {"prompt": "two plus four?", "chosen": [user("two plus four?"), bot("6")],
             "rejected": [user("two plus five?"), bot("9")]},
            "rejected",
            r"its user turn differs from 'prompt' \(first difference at character 10: 'ive\?' versus 'our\?'\)",
        ),
        (
            {"prompt": "two plus four?", "chosen": [user("two plus 4?"), bot("6")],
             "rejected": [user("two plus 4?"), bot("9")]},
            "chosen",
            "the user turn it shares with 'rejected' differs from 'prompt'.*repeat it exactly",
        ),
        (
            {"prompt": "p", "chosen": [bot("6")], "rejected": [bot("9")]},
            "chosen",
            "expected a string like 'prompt', or the whole conversation repeating 'prompt'.*opens with the assistant",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "system", "content": "a"}, user("p"), bot("6")],
             "rejected": [{"role": "system", "content": "b"}, user("p"), bot("9")]},
            "rejected",
            "does not start with the same conversation as 'chosen'",
        ),
        ({"prompt": "p", "chosen": [user("p")], "rejected": [user("p"), bot("9")]}, "chosen", "the response .* empty"),
        (
            {"prompt": "p", "chosen": [user("p"), user("p")], "rejected": [user("p"), bot("9")]},
            "chosen",
            "roles out of order",
        ),
        ({"prompt": "p", "chosen": [], "rejected": [user("p"), bot("9")]}, "chosen", "is empty"),
        (
            {"prompt": [user("p")], "chosen": [user("p")], "rejected": [user("p"), bot("9")]},
            "chosen",
            "the response after the repeated prompt is empty",
        ),
        (
            {"prompt": [user("p"), bot("a"), user("q")], "chosen": [user("p"), bot("a")],
             "rejected": [bot("9")]},
            "chosen",
            "opens with a user message, so it should repeat 'prompt'.*"
            "it has only 2 messages where 'prompt' has user: 'q'",
        ),
        (
            {"prompt": [user("p")], "chosen": [user("p"), bot("6"), bot("7")], "rejected": [bot("9")]},
            "chosen",
            "roles out of order: message 2 has role 'assistant' after 'assistant'",
        ),
    ],
)  # fmt: skip
def test_bad_repeated_prompts(row, field, problem):
    with pytest.raises(DataError, match=WHERE + f"'{field}': {problem}"):
        to_example(row, Layout.EXPLICIT_PROMPT, REF)


def test_unpaired_rows_convert_to_unpaired_examples():
    """More in tests/data/test_kto_data.py."""
    example = to_example({"prompt": "p", "completion": " c", "label": True}, Layout.UNPAIRED, REF)
    assert example == UnpairedExample("p", " c", True)
