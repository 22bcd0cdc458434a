"""Pipeline wiring: generation, the pipeline's report and the precomputed resume are connected right (issue #29).

Each test pins one connection that a plausible slip would break while every number stays plausible, so
the reward-level tests cannot see it (``tests/scripts/mutate.py`` applies those slips); cheapest first:

- a policy stub answering each prompt with its own sorted digits, a per-sample tag and EOS, then
  padding: each record holds its own prompt's samples, in order, cut right after EOS;
- a judge row of exactly ``max_length`` tokens is scored, one token more is not;
- each round's generate and DPO stages start from the previous round's export (the arguments the
  pipeline passes to the commands it runs);
- a policy with uniform next-token probabilities, so a sample is a function of its random stream
  only: different prompts are not sampled with the same stream;
- a resume of a precomputed-reference run reads the tables from the checkpoint: the cache deleted and
  the recompute patched to raise;
- the report's KL for each round against a direct ``log_softmax`` computation with that round's
  reference (``previous``: the policy the round started from; ``initial``: SFT).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import dpo_lightning.cli as cli
import dpo_lightning.pipeline.report as pipeline_report
import dpo_lightning.pipeline.rounds as pipeline
from dpo_lightning import DPOModule, PrecomputedReference, PreferenceDataModule
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs, sort_reward
from dpo_lightning.generation.module import GenerationModule, _until_eos
from dpo_lightning.generation.samples_io import write_manifest
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.pipeline import Evaluation, Stage, iterate, sample_with_ids, write_report
from dpo_lightning.references import REF_TABLES_KEY
from dpo_lightning.stages.export import EXPORT_MARKER, export_hf

from tiny import tiny_config

TOKENIZER = build_tokenizer()
EOS, PAD = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id  # 2, 3
DIGIT_0 = TOKENIZER.convert_tokens_to_ids("0")  # digits are ids DIGIT_0 .. DIGIT_0 + 9


# Six sort prompts of 1 to 5 digits (so batches are left-padded), two of them the same digits reordered.
PROMPTS = ["sort: 3 1 4 1 5 =", "sort: 2 7 =", "sort: 9 =", "sort: 8 0 6 =", "sort: 1 5 4 1 3 =", "sort: 4 4 2 0 ="]


def _prompts(batch_size: int = 3) -> PromptDataModule:
    return PromptDataModule(tokenizer=TOKENIZER, dataset=[{"prompt": p} for p in PROMPTS], batch_size=batch_size,
                            drop_columns=None)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def _tiny_policy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return load_causal_lm(None, config={**tiny_config(), "vocab_size": len(TOKENIZER)})


# ------------------------------------------------------------------------- samples: prompt, order, EOS


class TaggingPolicy(nn.Module):
    """``generate`` as Hugging Face lays it out (``(B * N, T + new)``, the N samples of prompt i in rows
    i*N .. i*N + N - 1, padding after EOS), answering sample j of a prompt with the prompt's digits
    sorted, j extra ``0`` digits as a tag, then EOS; a row longer than ``max_new_tokens`` is cut there
    (no EOS). So each response names the prompt and the sample it belongs to."""

    device = torch.device("cpu")  # as a Hugging Face model reports where it runs

    @staticmethod
    def answer(prompt_ids: list[int], j: int) -> list[int]:
        digits = sorted(t for t in prompt_ids if DIGIT_0 <= t <= DIGIT_0 + 9)
        return [*digits, *[DIGIT_0] * j, EOS]

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id,
                 num_return_sequences=1, **kwargs):
        assert (pad_token_id, eos_token_id) == (PAD, EOS)
        rows, previous, j = [], None, 0
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].tolist()
            # The caller repeats each prompt N times in a row (or asks for N sequences per row): sample j of a
            # prompt is its j-th consecutive row (the test's prompts are distinct).
            j = j + 1 if prompt == previous else 0
            previous = prompt
            for extra in range(num_return_sequences):
                new = self.answer(prompt, j + extra)[:max_new_tokens]
                rows.append(ids.tolist() + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def _expected_ids(prompt_ids: list[int], j: int, max_new_tokens: int) -> list[int]:
    return TaggingPolicy.answer(prompt_ids, j)[:max_new_tokens]


def test_each_prompt_gets_its_own_samples_in_order_cut_after_eos():
    """3 prompts per batch, 3 samples each: record i holds exactly prompt i's answers, sample j tagged
    with j zeros; the counted tokens run up to and including each EOS (padding after it not counted),
    and a row that hits max_new_tokens is kept whole."""
    data = _prompts()
    max_new_tokens = 7  # 5 digits + tag 1 + EOS fits exactly; 5 digits + tag 2 + EOS is cut, without EOS
    module = GenerationModule(model=_tiny_policy(), tokenizer=TOKENIZER, num_samples=3,
                              max_new_tokens=max_new_tokens)
    module.model = TaggingPolicy()
    records = [r for batch in _trainer().predict(module, datamodule=data) for r in batch]
    assert [r["prompt_id"] for r in records] == list(data.prompts["prompt_id"])
    expected_tokens = 0
    for record, prompt_ids in zip(records, data.prompts["input_ids"]):
        want = []
        for j in range(3):
            ids = _expected_ids(prompt_ids, j, max_new_tokens)
            expected_tokens += len(ids)
            want.append(TOKENIZER.decode(ids, skip_special_tokens=True))
        assert record["responses"] == [" " + w for w in want], record
        assert sort_reward(record["prompt"], record["responses"][0]) == 1.0
    assert any(len(TaggingPolicy.answer(p, 2)) > max_new_tokens for p in data.prompts["input_ids"])  # ... some don't
    assert module.generated_tokens == expected_tokens


def test_the_report_samples_each_prompt_with_its_exact_ids_up_to_eos():
    """The report's sampler (`pipeline.sample_with_ids`) pairs each prompt with its own samples' exact ids:
    up to and including EOS, no padding after it (the KL sums over exactly these)."""
    data = _prompts()
    rows = sample_with_ids(TaggingPolicy(), data, num_samples=3, max_new_tokens=8, seed=0)
    assert [r["prompt_ids"] for r in rows] == list(data.prompts["input_ids"])
    for row in rows:
        ids = [_expected_ids(row["prompt_ids"], j, 8) for j in range(3)]
        assert [s for s, _ in row["samples"]] == ids
        assert [t for _, t in row["samples"]] == [" " + TOKENIZER.decode(i, skip_special_tokens=True) for i in ids]


@pytest.mark.parametrize(
    "ids, eos, pad, kept",
    [
        ([7, 8, 2, 3, 3], 2, 3, [7, 8, 2]),  # EOS kept, padding after it dropped
        ([7, 8, 2, 9, 3], 2, 3, [7, 8, 2]),  # anything after the first EOS dropped
        ([2, 3, 3], 2, 3, [2]),  # EOS first: an empty response that ended
        ([7, 2, 8, 2], 2, 3, [7, 2]),  # the first EOS counts
        ([7, 8, 9], 2, 3, [7, 8, 9]),  # no EOS (max_new_tokens reached): all of it
        ([7, 8, 3, 3], 2, 3, [7, 8]),  # no EOS, trailing padding
        ([7, 2, 2, 2], 2, 2, [7, 2]),  # pad == EOS (GPT-2 style): one EOS kept
        ([7, 8, 3], None, 3, [7, 8]),  # no EOS id
    ],
    ids=["eos-then-pad", "eos-then-token", "eos-first", "first-eos", "no-eos", "no-eos-pad", "pad-is-eos",
         "no-eos-id"],
)
def test_until_eos(ids, eos, pad, kept):
    assert _until_eos(ids, eos, pad) == kept


# ---------------------------------------------------------------------------------------- judge length


def test_a_judge_row_of_exactly_max_length_is_scored():
    """"sort: 5 =" + " 5" is <s> sort: 5 = 5 </s>: 6 tokens. max_length 6 scores it; 5 does not."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpo_lightning.generation.judges import RewardModelJudge

    config = AutoConfig.for_model(**{**tiny_config(), "vocab_size": len(TOKENIZER)}, num_labels=1,
                                  pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(RewardModelJudge(model, tokenizer=TOKENIZER, max_length=6).score(["sort: 5 ="], [" 5"])[0],
                      float)
    short = RewardModelJudge(model, tokenizer=TOKENIZER, max_length=5)
    assert short.score(["sort: 5 ="], [" 5"]) == [None]
    assert short.stats.examples == {"too long": ["6 tokens > max_length 5"]}


# --------------------------------------------------------------------------- each round's starting point


class FakeCommands:
    """Stands in for ``fit`` and ``generate`` as the pipeline calls them: records the arguments and writes
    what a finished stage leaves (an export with its marker; ``pairs.jsonl``), so only the chaining runs."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.report: dict = {}

        def options(args: list[str]) -> dict[str, str]:
            return {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}

        def fit(args, **kwargs):
            opts = options(args)
            export = (Path(opts["--trainer.logger.init_args.save_dir"]) / opts["--trainer.logger.init_args.name"]
                      / f"version_{opts['--trainer.logger.init_args.version']}" / "hf_export")
            export.mkdir(parents=True)
            (export / "config.json").write_text("{}")
            (export / EXPORT_MARKER).write_text("")
            self.calls.append(("fit", opts))

        def generate(args, **kwargs):
            opts = options(args)
            out = Path(opts["--output.output_dir"])
            out.mkdir(parents=True, exist_ok=True)  # the pipeline's stage record is already there
            (out / "pairs.jsonl").write_text("")
            write_manifest(out, {"pairs": {"count": 1}})  # what marks generate's pairs as written
            self.calls.append(("generate", opts))

        def report(out, policies, initial, evaluation, reference, timings=None):
            self.report = {"policies": policies, "initial": initial, "reference": reference}
            return []

        # The settings a stage records: the arguments themselves (nothing is parsed, no recipe exists).
        monkeypatch.setattr(cli, "resolved_config", lambda command, args: {"command": command, "args": list(args)})
        monkeypatch.setattr(cli, "trainer_settings", lambda command, args: {"devices": 1})  # one process
        monkeypatch.setattr(cli, "cli_main", fit)
        monkeypatch.setattr(cli, "generate_main", generate)
        monkeypatch.setattr(pipeline, "write_report", report)


@pytest.mark.parametrize("rank, enabled, written", [(0, True, True), (1, True, False), (0, False, False)])
def test_the_report_is_written_by_global_rank_0_only(tmp_path, monkeypatch, caplog, rank, enabled, written):
    """Every rank of a multi-GPU run runs ``iterate``; the report (which loads three policies and samples the
    held-out prompts) runs on the global rank 0 process only, and not at all with ``evaluation.enabled``
    false, which is logged (issue #30 item 2: every rank loaded each round's 7B policy on CPU)."""
    from lightning.pytorch.utilities import rank_zero_only

    commands = FakeCommands(monkeypatch)
    monkeypatch.setattr(rank_zero_only, "rank", rank)  # as each stage's Trainer sets it
    with caplog.at_level("INFO", logger="dpo_lightning.pipeline"):
        rows = iterate(str(tmp_path), Stage("sft.yaml"), Stage("generate.yaml"), Stage("dpo.yaml"), rounds=1,
                       evaluation=Evaluation(enabled=enabled))
    assert rows == [] and bool(commands.report) is written
    assert [kind for kind, _ in commands.calls] == ["fit", "generate", "fit"]  # every rank trains every stage
    if not enabled:
        assert "the report is skipped (evaluation.enabled is false)" in caplog.text
    elif rank:
        assert "rank 1: the report is written by the global rank 0 process only" in caplog.text


@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_each_round_samples_and_trains_from_the_previous_rounds_policy(tmp_path, monkeypatch, reference):
    """3 rounds: round r's generate samples from round r-1's export (round 0: SFT's), its DPO starts from
    that export, trains on that round's pairs, with the reference the reference mode names; the report
    gets the policies in round order."""
    commands = FakeCommands(monkeypatch)
    stages = [Stage("sft.yaml"), Stage("generate.yaml"), Stage("dpo.yaml")]
    iterate(str(tmp_path), *stages, rounds=3, reference=reference)
    exports = [str(tmp_path / "sft" / "stage" / "version_0" / "hf_export")]
    exports += [str(tmp_path / f"round_{r}" / "dpo" / "version_0" / "hf_export") for r in (1, 2, 3)]
    kinds = [kind for kind, _ in commands.calls]
    assert kinds == ["fit", "generate", "fit", "generate", "fit", "generate", "fit"]
    assert "--model.model" not in commands.calls[0][1]  # SFT from its recipe
    seeds = set()
    for r in (1, 2, 3):
        (_, gen), (_, fit) = commands.calls[2 * r - 1], commands.calls[2 * r]
        assert gen["--model.model"] == gen["--data.tokenizer"] == exports[r - 1], r
        assert gen["--output.output_dir"] == str(tmp_path / f"round_{r}" / "generate")
        seeds.add(gen["--model.seed"])
        assert fit["--model.model"] == fit["--data.tokenizer"] == exports[r - 1], r
        assert fit["--data.dataset"] == str(tmp_path / f"round_{r}" / "generate" / "pairs.jsonl")
        # previous: no ref_model, so DPO freezes a copy of the policy it starts from
        assert fit.get("--model.ref_model") == (exports[0] if reference == "initial" else None), r
    assert len(seeds) == 3  # each round samples new responses
    assert commands.report == {"policies": exports, "initial": exports[0], "reference": reference}


# ------------------------------------------------------------------------------- the sampling streams


def _uniform_policy() -> nn.Module:
    """Every next token equally likely whatever the prompt: a sample is a function of its random stream."""
    model = _tiny_policy()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@functools.cache
def _sample_uniform(batch_size: int) -> dict[str, list[str]]:
    module = GenerationModule(model=_uniform_policy(), tokenizer=TOKENIZER, num_samples=2, max_new_tokens=8, seed=3)
    records = [r for batch in _trainer().predict(module, datamodule=_prompts(batch_size=batch_size)) for r in batch]
    return {r["prompt_id"]: r["responses"] for r in records}


def test_different_prompts_are_sampled_with_different_streams():
    """One prompt per batch under a policy that ignores its input: each prompt's samples differ from every
    other's, so the seed depends on the prompt (seeding every batch alike would repeat one stream)."""
    samples = _sample_uniform(batch_size=1)
    assert len(samples) == 6
    assert len({tuple(responses) for responses in samples.values()}) == 6, samples


def test_a_prompts_samples_do_not_depend_on_its_batch():
    """The same prompts alone and in batches of 3 (left-padded): each prompt's samples are the same, whatever
    its batch and its position in it."""
    alone = _sample_uniform(batch_size=1)
    assert _sample_uniform(batch_size=3) == alone


# --------------------------------------------------------------------------- precomputed reference resume


def test_precomputed_resume_reads_the_tables_from_the_checkpoint(tmp_path, monkeypatch):
    """2 steps with a precomputed reference, checkpointed; the cache deleted and the recompute patched to
    raise, the run resumes to step 4 on the checkpoint's tables, whose values are the live reference's."""
    import shutil

    import dpo_lightning.references.precomputed as reference_module

    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(24, seed=5)))
    cache, ckpts = tmp_path / "cache", tmp_path / "ckpt"

    def module() -> DPOModule:
        torch.manual_seed(0)
        return DPOModule(model_config=tiny_config("llama", vocab_size=16),
                         reference=PrecomputedReference(cache_dir=str(cache)),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))

    def data() -> PreferenceDataModule:
        return PreferenceDataModule(tokenizer="synthetic:sort", dataset=str(path), val_fraction=0.25, max_length=32,
                                    batch_size=4, seed=1)

    live_ref = module().ref_model  # the initial policy, frozen: what the tables hold
    checkpoint = ModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1)
    _trainer(max_steps=2, callbacks=[checkpoint], num_sanity_val_steps=0).fit(module(), datamodule=data())
    saved = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)[REF_TABLES_KEY]
    assert set(saved) == {"train", "validation"}
    shutil.rmtree(cache)

    def recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed on resume despite the checkpoint's tables")

    monkeypatch.setattr(reference_module, "compute_reference_logps", recompute)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                live = pl_module.sequence_logps(live_ref, batch).logps
            torch.testing.assert_close(batch["ref_logps"], live, rtol=0, atol=1e-5)
            seen.append(trainer.global_step)

    resumed = module()
    trainer = _trainer(max_steps=4, callbacks=[Probe()], enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(resumed, datamodule=data(), ckpt_path=ckpts / "last.ckpt")
    assert seen == [2, 3] and trainer.global_step == 4 and resumed.ref_model is None
    assert not cache.exists()  # nothing computed, so nothing cached


# ----------------------------------------------------------------------------------------- the report


def _perturbed(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return model


@pytest.fixture(scope="module")
def three_policies(tmp_path_factory) -> list[str]:
    """SFT (random init, its output layer scaled up: peaked next-token distributions, as a trained model's),
    round 1 = SFT perturbed, round 2 = round 1 perturbed: export folders."""
    root = tmp_path_factory.mktemp("policies")
    model, folders = _tiny_policy(), []
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    for r in range(3):
        if r:
            model = _perturbed(model, seed=r)
        folders.append(str(root / f"round_{r}"))
        export_hf(model, TOKENIZER, folders[-1])
    return folders


def _hand_logps(model: nn.Module, prompt_ids: list[int], response: list[int]) -> float:
    """Sum of log p(response token) after the prompt, by a plain float32 ``log_softmax`` of one unpadded row."""
    ids = torch.tensor([prompt_ids + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
    logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,)
    return logps[len(prompt_ids) - 1 :].sum().item()


def _hand_kls(policy: str, reference: str, evaluation: Evaluation) -> torch.Tensor:
    """Per sample of ``policy`` (sampled as the report samples): log pi(y) - log ref(y), computed by hand."""
    data = PromptDataModule(tokenizer=policy, dataset=evaluation.dataset, split=evaluation.split,
                            limit=evaluation.limit, batch_size=64, drop_columns=None)
    pi, ref = load_causal_lm(policy).eval(), load_causal_lm(reference).eval()
    rows = sample_with_ids(pi, data, evaluation.num_samples, evaluation.max_new_tokens, evaluation.seed)
    return torch.tensor([_hand_logps(pi, row["prompt_ids"], ids) - _hand_logps(ref, row["prompt_ids"], ids)
                         for row in rows for ids, _ in row["samples"]], dtype=torch.float64)


def test_report_kl_is_each_rounds_policy_against_its_reference(three_policies, tmp_path, monkeypatch):
    """Round r's KL (and its standard error) is the mean over the policy's samples of log pi - log ref, where
    ref is round r-1's policy (``previous``) or SFT (``initial``); round 0 (SFT against itself) is 0. The
    two references give round 2 KLs far apart (about 1.4 and 2.5 nats), so taking the other one, or the
    reference on both sides, cannot pass the 1e-4 tolerance."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    evaluation = Evaluation(dataset=str(prompts), split="train", limit=None, num_samples=2, max_new_tokens=6, seed=1)
    sft, round_1, round_2 = three_policies
    want = {(1, sft): _hand_kls(round_1, sft, evaluation), (2, round_1): _hand_kls(round_2, round_1, evaluation),
            (2, sft): _hand_kls(round_2, sft, evaluation)}
    assert abs(want[2, round_1].mean() - want[2, sft].mean()) > 0.5 and want[1, sft].mean().abs() > 0.5
    monkeypatch.setattr(pipeline_report, "_plot", lambda rows, path: None)  # the figure is not what is tested here
    for reference in ("previous", "initial"):
        out = tmp_path / reference
        out.mkdir()
        rows = write_report(out, three_policies, sft, evaluation, reference)
        assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["kl"] == 0.0
        for r, ref in ((1, sft), (2, round_1 if reference == "previous" else sft)):
            kls = want[r, ref]
            assert rows[r]["kl"] == pytest.approx(kls.mean().item(), abs=1e-4), (reference, r)
            assert rows[r]["kl_stderr"] == pytest.approx(kls.std().item() / math.sqrt(len(kls)), abs=1e-4)
