"""LLM judges: verdicts read from next-token logits, both orders averaged (exact swap symmetry), batch
invariance, a hand-built judge whose verdicts are known, chat templates, and the errors raised before any
sampling (placeholders, verdict tokens, unknown words, options); through the predict path and the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.generation.judges import resolve_judge
from dpo_lightning.generation.judges.llm import LLMPairwiseJudge, LLMScoreJudge, _combine
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.stages.export import export_hf

from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PAIRWISE = "{prompt}{response_a} ={response_b} ="  # in the sort task's own words: every word is a token
SCORE = "{prompt}{response} ="
DIGITS = [str(d) for d in range(10)]
PROMPTS = ["sort: 3 1 2 ="] * 4 + ["sort: 5 4 ="] * 3 + ["sort: 7 ="]
RESPONSES = [" 1 2 3", " 3 2 1", " 1 3", " 2 1 3", " 4 5", " 5 4", " 4"]


@pytest.fixture(scope="module")
def judge_path(tmp_path_factory) -> str:
    """A tiny random-init Llama with the sort tokenizer, saved as an export folder. Weights drawn with std 0.5
    instead of 0.02: at the usual init, attention barely mixes tokens and every verdict is 0.5 to 1e-4."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = load_causal_lm(None, config={**tiny_config(), "vocab_size": len(tokenizer), "initializer_range": 0.5})
    folder = tmp_path_factory.mktemp("judge") / "export"
    export_hf(model, tokenizer, folder)
    return str(folder)


def _pairwise(path: str, **options) -> LLMPairwiseJudge:
    return LLMPairwiseJudge(path, template=PAIRWISE, verdicts=[" 1", " 2"], device="cpu", **options)


def _score(path: str, **options) -> LLMScoreJudge:
    return LLMScoreJudge(path, template=SCORE, verdicts=DIGITS, device="cpu", **options)


# ------------------------------------------------------------------------------------------ the combination


@pytest.mark.parametrize("q_ab, q_ba", [(0.9, 0.2), (0.2, 0.9), (0.5, 0.5), (0.3, 0.3 + 3e-17), (1.0, 0.0),
                                        (0.123456789, 0.987654321), (0.7, 0.7)])
def test_both_orders_combine_to_an_exact_complement(q_ab, q_ba):
    """p(a>b) = (q_ab + 1 - q_ba) / 2: (0.9, 0.2) -> 0.85, its swap (0.2, 0.9) -> 0.15; a judge that always
    names the first position (q_ab == q_ba) -> 0.5. Swapping gives exactly 1 - p, in floats."""
    p, swapped = _combine(q_ab, q_ba), _combine(q_ba, q_ab)
    assert p == pytest.approx((q_ab + 1 - q_ba) / 2, abs=1e-15)
    assert p == 1.0 - swapped and swapped == 1.0 - p
    if q_ab == q_ba:
        assert p == 0.5


# ------------------------------------------------------------------------------------------ random-init judge


def test_shapes_and_ranges(judge_path):
    """One score per row; pairwise scores are mean win probabilities in [0, 1] whose mean over one prompt's
    responses is exactly 0.5 (each comparison gives p to one side and 1 - p to the other); a prompt with one
    response has no score; rating scores lie within [0, 9]."""
    judge = _pairwise(judge_path, batch_size=4)
    scores = judge.score(PROMPTS, RESPONSES + [" 7"])
    assert len(scores) == 8 and scores[-1] is None
    assert all(0 <= s <= 1 for s in scores[:-1])
    assert sum(scores[:4]) / 4 == pytest.approx(0.5, abs=1e-12)
    assert sum(scores[4:7]) / 3 == pytest.approx(0.5, abs=1e-12)
    assert max(scores[:7]) - min(scores[:7]) > 0.05  # the judge does tell responses apart
    assert judge.stats.scored == 7 and dict(judge.stats.failed) == {"no other response to compare with": 1}
    rated = _score(judge_path).score(PROMPTS, RESPONSES + [" 7"])
    assert len(rated) == 8 and all(0 <= s <= 9 for s in rated)
    assert len(set(rated)) > 4


def test_swapping_the_two_responses_gives_one_minus_p(judge_path):
    """compare(a, b) == 1 - compare(b, a) exactly, row by row, for the random-init judge; and compare(a, a) is 0.5."""
    judge = _pairwise(judge_path, batch_size=3)
    firsts, seconds = RESPONSES[:4] + [" 4 5"], [" 3 2 1", " 1 2 3", " 2 1 3", " 1 3", " 5 4"]
    prompts = PROMPTS[:5]
    forward = judge.compare(prompts, firsts, seconds)
    backward = judge.compare(prompts, seconds, firsts)
    assert all(p == 1.0 - q for p, q in zip(forward, backward)), (forward, backward)
    assert any(abs(p - 0.5) > 0.01 for p in forward)
    assert judge.compare(["sort: 2 1 ="], [" 1 2"], [" 1 2"]) == [0.5]


def test_batching_does_not_change_the_verdicts(judge_path):
    """Batch of 1 against batches of 3 and of 64 (rows of different lengths padded together): equal to 1e-6."""
    for judge, sizes in ((_pairwise(judge_path, batch_size=1), (3, 64)), (_score(judge_path, batch_size=1), (5,))):
        one = judge.score(PROMPTS[:7], RESPONSES)
        for size in sizes:
            judge.batch_size = size
            torch.testing.assert_close(torch.tensor(judge.score(PROMPTS[:7], RESPONSES)), torch.tensor(one),
                                       rtol=0, atol=1e-6)


def test_verdict_is_the_softmax_over_the_verdict_tokens_of_the_next_token_logits(judge_path):
    """The score judge by hand: the model's logits after "<s> sort: 3 1 2 = 1 2 3 =", softmaxed over the ids of
    "0".."9" only, times 0..9."""
    judge = _score(judge_path)
    tokenizer = judge.tokenizer
    ids = tokenizer("sort: 3 1 2 = 1 2 3 =").input_ids
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    expected = (torch.softmax(logits[digits].double(), -1) * torch.arange(10)).sum().item()
    assert judge.score(["sort: 3 1 2 ="], [" 1 2 3"])[0] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------ a judge with known verdicts


def _last_token_judge(tokenizer, favoured: str, verdict_rows: dict[str, str], logit: float):
    """A Llama whose next-token logits depend only on the last input token: every layer's output projections
    are zero, so the residual stream is the token's embedding, and RMSNorm makes it a unit direction times
    sqrt(H). ``favoured``'s embedding is e0, every other token's e1; the LM head maps e0 to ``logit`` on the token
    ``verdict_rows["favoured"]`` and e1 to ``logit`` on ``verdict_rows["other"]``, 0 elsewhere."""
    config = {**tiny_config(), "vocab_size": len(tokenizer), "rms_norm_eps": 1e-12}  # the norm: exactly sqrt(H)
    model = load_causal_lm(None, config=config).eval()
    hidden = config["hidden_size"]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = torch.zeros(len(tokenizer), hidden)
        embeddings[:, 1] = 1.0
        embeddings[tokenizer.convert_tokens_to_ids(favoured)] = torch.nn.functional.one_hot(torch.tensor(0), hidden)
        model.model.embed_tokens.weight.copy_(embeddings)
        head = torch.zeros(len(tokenizer), hidden)
        scale = logit / math.sqrt(hidden)  # RMSNorm turns a one-hot row into sqrt(H) on that axis
        head[tokenizer.convert_tokens_to_ids(verdict_rows["favoured"]), 0] = scale
        head[tokenizer.convert_tokens_to_ids(verdict_rows["other"]), 1] = scale
        model.lm_head.weight.copy_(head)
    return model


def test_a_judge_with_known_verdicts_pairwise():
    """Template "{prompt}{response_a} ={response_b}": the last token is the second response's last digit. The
    judge says "2" (second better) with probability 3/4 after a 9 (logit ln 3 vs 0), else "1" with 3/4.

    a = " 1 9", b = " 1 3": order (a, b) ends in 3 -> P(first) = 3/4; order (b, a) ends in 9 -> P(first) = 1/4:
    p(a > b) = (3/4 + 1 - 1/4) / 2 = 3/4, both orders agreeing on a. c = " 2 3", d = " 1 3": neither ends in 9,
    both orders say "first" with 3/4, pure position bias: p = (3/4 + 1/4) / 2 = 1/2. As scores over one prompt's
    [a, b, c]: a beats b and c with 3/4 -> 3/4; b and c tie at 1/2 with each other -> (1/4 + 1/2) / 2 = 3/8 each.
    Asking one order only would give p(a > b) = 3/4 but p(c > d) = 3/4 as well."""
    tokenizer = build_tokenizer()
    model = _last_token_judge(tokenizer, "9", {"favoured": "2", "other": "1"}, math.log(3))
    judge = LLMPairwiseJudge(model, tokenizer, template="{prompt}{response_a} ={response_b}", verdicts=["1", "2"])
    p = judge.compare(["sort: 9 1 =", "sort: 3 2 ="], [" 1 9", " 2 3"], [" 1 3", " 1 3"])
    assert p == pytest.approx([0.75, 0.5], abs=1e-5)
    assert judge.score(["sort: 9 1 ="] * 3, [" 1 9", " 1 3", " 2 3"]) == pytest.approx([0.75, 0.375, 0.375], abs=1e-5)


def test_a_judge_with_known_verdicts_score():
    """Template "{prompt}{response}", ratings "0".."9": after a response ending in 9 the logit of "9" is ln 3 and
    the other nine ratings' 0, so P("9") = 3/12 and the rest 1/12 each: 9 * 3/12 + (0 + ... + 8)/12 = 5.25;
    after any other last token "1" gets ln 3: 1 * 3/12 + (0 + 2 + ... + 9)/12 = 0.25 + 44/12 = 3.9167."""
    tokenizer = build_tokenizer()
    model = _last_token_judge(tokenizer, "9", {"favoured": "9", "other": "1"}, math.log(3))
    judge = LLMScoreJudge(model, tokenizer, template="{prompt}{response}", verdicts=DIGITS)
    assert judge.score(["sort: 9 1 =", "sort: 9 1 ="], [" 1 9", " 9 1"]) == pytest.approx([5.25, 0.25 + 44 / 12],
                                                                                          abs=1e-5)


# ------------------------------------------------------------------------------------------ templates and tokens

CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} ={% else %}"
        "{{ m['content'] }} </s>{% endif %}{% endfor %}")


def test_chat_template_is_applied_when_the_judge_tokenizer_has_one(judge_path):
    """With a chat template the question is one user message, rendered with the generation prompt and
    tokenized without adding special tokens: "{prompt}{response}" -> "sort: 2 1 = 1 2" + " =" (the template's)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT
    judge = LLMScoreJudge(judge_path, tokenizer, template="{prompt}{response}", verdicts=DIGITS, device="cpu")
    assert judge.render({"prompt": "sort: 2 1 =", "response": " 1 2"}) == tokenizer(
        "sort: 2 1 = 1 2 =", add_special_tokens=False).input_ids
    plain = LLMScoreJudge(judge_path, template="{prompt}{response} =", verdicts=DIGITS, device="cpu")
    assert plain.render({"prompt": "sort: 2 1 =", "response": " 1 2"}) == [1, *judge.render(
        {"prompt": "sort: 2 1 =", "response": " 1 2"})]  # BOS from the tokenizer's own rule
    # A message-list prompt is read as "role: content" lines; "user:" is not a word of this vocabulary, so
    # the rendered row carries <unk> there (the judge still answers).
    assert judge.score([[{"role": "user", "content": "sort: 2 1 ="}]], [" 1 2"])[0] is not None
    tokenizer.chat_template = "{{ raise_exception('no user turns here') }}"
    with pytest.raises(ValueError, match="chat template fails on one user message: no user turns here"):
        LLMScoreJudge(judge_path, tokenizer, template="{prompt}{response}", verdicts=DIGITS)


@pytest.mark.parametrize("cls, template, match", [
    (LLMPairwiseJudge, "{prompt}{response_a}", r"missing \{response_b\}"),
    (LLMPairwiseJudge, "{prompt}{response_a}{respones_b}", r"missing \{response_b\}; unknown \{respones_b\}"),
    (LLMScoreJudge, "{prompt} =", r"missing \{response\}"),
    (LLMScoreJudge, "{prompt}{response}{response_a}", r"unknown \{response_a\}"),
    (LLMScoreJudge, "  ", "non-empty string"),
    (LLMScoreJudge, "Rate {prompt}{response} =", r"words 'Rate' are not in the judge tokenizer's vocabulary"),
])
def test_a_bad_template_is_refused_before_anything_runs(judge_path, cls, template, match):
    verdicts = [" 1", " 2"] if cls is LLMPairwiseJudge else DIGITS
    with pytest.raises(ValueError, match=match):
        cls.check(judge_path, template=template, verdicts=verdicts)  # without the weights, as the CLI does
    with pytest.raises(ValueError, match=match):
        cls(judge_path, template=template, verdicts=verdicts)


@pytest.mark.parametrize("cls, verdicts, match", [
    (LLMPairwiseJudge, [" 1 2", " 3"], r"verdict ' 1 2' is 2 tokens \['1', '2'\].*not one"),
    (LLMPairwiseJudge, ["A", "B"], "verdict 'A' is not in the judge tokenizer's vocabulary"),
    (LLMPairwiseJudge, [" 1", "1"], "map to the token ids"),
    (LLMPairwiseJudge, [" 1", " 2", " 3"], "takes 2 verdicts"),
    (LLMScoreJudge, ["=", "1"], "rating token '=' is not a number"),
    (LLMScoreJudge, ["1"], "at least 2 verdict tokens"),
    (LLMPairwiseJudge, None, "verdict ' A' is not in the judge tokenizer's vocabulary"),  # the defaults
])
def test_verdicts_must_be_single_distinct_known_tokens(judge_path, cls, verdicts, match):
    template = PAIRWISE if cls is LLMPairwiseJudge else SCORE
    with pytest.raises(ValueError, match=match):
        cls.check(judge_path, template=template, verdicts=verdicts)


def test_rows_too_long_get_no_verdict(judge_path):
    """max_length 13: "<s> sort: 3 1 2 = 1 2 3 = 3 2 1 =" is 1 + 1 + 3 + 1 + 3 + 1 + 3 + 1 = 14 tokens -> no
    verdict for that pair, so neither response has a score (each counted, with the reason); "<s> sort: 5 = 5 =
    5 5 =" is 9 -> scored."""
    judge = _pairwise(judge_path, max_length=13)
    scores = judge.score(["sort: 3 1 2 ="] * 2 + ["sort: 5 ="] * 2, [" 1 2 3", " 3 2 1", " 5", " 5 5"])
    assert scores[:2] == [None, None] and all(isinstance(s, float) for s in scores[2:])
    assert judge.stats.examples == {"too long": ["14 tokens > max_length 13"] * 2}


def test_resolve_judge_builds_llm_judges_with_options_and_refuses_unknown_ones(judge_path):
    judge = resolve_judge(f"llm_pairwise:{judge_path}", template=PAIRWISE, verdicts=[" 1", " 2"], batch_size=2)
    assert isinstance(judge, LLMPairwiseJudge) and judge.batch_size == 2
    assert judge.spec().startswith(f"llm_pairwise:{judge_path}@")
    other = resolve_judge(f"llm_pairwise:{judge_path}", template=PAIRWISE, verdicts=[" 2", " 1"])
    assert other.spec() != judge.spec()  # another question is another judge: a resumed run refuses the mix
    assert isinstance(resolve_judge(f"llm_score:{judge_path}", template=SCORE, verdicts=DIGITS), LLMScoreJudge)
    with pytest.raises(ValueError, match="LLMPairwiseJudge takes no option 'templat'; its options: tokenizer, "
                                         "template, verdicts"):
        resolve_judge(f"llm_pairwise:{judge_path}", templat=PAIRWISE)
    with pytest.raises(ValueError, match="takes no option 'templat'"):
        LLMPairwiseJudge.check(judge_path, templat=PAIRWISE)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        LLMScoreJudge.check(str(Path(judge_path) / "missing"))


# ------------------------------------------------------------------------------------------ the predict path


def test_generate_command_with_the_llm_judge_recipe(judge_path, tmp_path):
    """`python -m dpo_lightning generate --config recipes/tiny_generate_llm_judge.yaml`, with the random-init
    export as policy and judge, 12 prompts: every response scored by the pairwise judge (a mean win probability,
    so each prompt's scores average 0.5), pairs written; the judge's spec (with its template digest) in every
    record's settings."""
    from dpo_lightning.cli import main

    out = tmp_path / "gen"
    main(["generate", "--config", str(ROOT / "recipes/tiny_generate_llm_judge.yaml"), "--model.model", judge_path,
          "--data.tokenizer", judge_path, "--output.judge", f"llm_pairwise:{judge_path}", "--data.limit", "12",
          "--output.output_dir", str(out)])
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for record in records:
        scores = record["scores"]
        assert len(scores) == 4 and all(0 <= s <= 1 for s in scores)
        assert sum(scores) / 4 == pytest.approx(0.5, abs=1e-9)
        assert record["settings"]["judge"].startswith(f"llm_pairwise:{judge_path}@")
    assert (out / "pairs.jsonl").read_text().strip()


def test_generate_refuses_a_bad_llm_judge_before_loading_the_policy(judge_path, tmp_path, capsys):
    """A typo in the template's placeholders stops `generate` before the policy loads (a folder that holds no
    model would fail when it loads, so it is never reached)."""
    from dpo_lightning.cli import main

    (tmp_path / "no_policy").mkdir()
    with pytest.raises((ValueError, SystemExit)) as err:
        main(["generate", "--config", str(ROOT / "recipes/tiny_generate_llm_judge.yaml"),
              "--model.model", str(tmp_path / "no_policy"), "--data.tokenizer", judge_path,
              "--output.judge", f"llm_pairwise:{judge_path}", "--output.judge_options.template",
              "{prompt}{response_a} ={reponse_b} =", "--output.output_dir", str(tmp_path / "gen")])
    message = str(err.value) + capsys.readouterr().err
    assert r"unknown {reponse_b}" in message and "no_policy" not in message


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_only_the_last_positions_logits_are_computed_and_they_are_the_full_forwards(arch):
    """Rows of different lengths right-padded into one batch, logits kept at each row's last position only
    (``logits_to_keep`` with a tensor of positions): equal to each row's own full forward (1e-5), for every
    tiny architecture the suite covers (GPT-2: learned absolute positions)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = load_causal_lm(None, config={**tiny_config(arch), "vocab_size": len(tokenizer), "initializer_range": 0.5})
    judge = LLMScoreJudge(model.eval(), tokenizer, template=SCORE, verdicts=DIGITS, batch_size=8)
    assert judge._keep_last
    rows = [judge.render({"prompt": p, "response": r}) for p, r in zip(PROMPTS, RESPONSES)]
    digits = [tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    with torch.no_grad():
        alone = torch.stack([torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1, digits].double(), -1)
                             for row in rows])  # (n, 10)
    torch.testing.assert_close(judge.verdict_probs(rows), alone, rtol=0, atol=1e-5)
