"""Module wiring: the settings a DPOModule or KTOModule is built with reach its loss and its logged metrics.

Each test builds a module with non-default settings (beta 0.37, label smoothing 0.1, weights 0.7/1.3,
discopop_tau 0.2, ...), computes the policy and reference log-probs of a batch independently of the module's
log-prob code (a plain float32 ``log_softmax`` over the full vocabulary of the module's own models), feeds
them to the pure functions of ``losses.py`` with the same settings, and compares with both the module's
forward output and every metric a ``trainer.validate`` logs. Each test also checks that the setting matters
for its batch: dropping it (beta back to 0.1, weights to 1, a hyper-parameter to its default, the eval
padding counted) would move the numbers by more than 1e-3, far beyond the 1e-5 tolerance, so a module that
ignored the setting could not pass.
"""

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dpo_lightning import DPOModule, KTOModule
from dpo_lightning.data.kto import KTOCollator
from dpo_lightning.losses import LOSSES, LossOutput, PairLogps, kto_loss
from dpo_lightning.training.metrics import KTO_METRIC_NAMES, METRIC_NAMES

from tiny import VOCAB, random_batch, tiny_config

B = 4  # pairs (DPO) or real examples (KTO) per batch
TOL = dict(rel=1e-5, abs=1e-5)  # measured: the module and the independent log-probs differ by <= 2e-6


def hand_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(logps, n_tokens, logits_sum)``, each ``(N,)``: sum of log p(label) over the response tokens,
    their number, and the sum over them of the mean logit over the vocabulary (TRL's ``logits/*``)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits = logits[:, :-1]  # (N, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (N, T-1)
    mask = labels != -100
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (N, T-1)
    return (token_logps * mask).sum(1), mask.sum(1).float(), (logits.mean(-1) * mask).sum(1)


def hand_token_stats(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(entropy_sum, correct)``, each ``(N,)``: over the response tokens, the summed entropy (nats) of the
    predictive distribution, and how many labels are the argmax (TRL's ``entropy``, ``mean_token_accuracy``)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]  # (N, T-1)
    mask = labels != -100
    p = logits.softmax(-1)
    entropy = -(p * logits.log_softmax(-1)).sum(-1)  # (N, T-1)
    correct = (logits.argmax(-1) == labels) & mask
    return (entropy * mask).sum(1), correct.sum(1).float()


def perturb_(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move a model off its copy, so policy and reference differ and every log-ratio is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def validate(module: L.LightningModule, batch: dict[str, Tensor]) -> dict[str, float]:
    """The ``val/*`` metrics Lightning logs for one validation batch."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    logged = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)[0]
    return {k: v for k, v in logged.items() if k.startswith("val/")}


def assert_logged(logged: dict[str, float], expected: dict[str, float]) -> None:
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, **TOL), key


# ---------------------------------------------------------------------------------------------- DPO

# A term is (weight, loss name, keyword arguments of the pure function).
Terms = list[tuple[float, str, dict]]
BETA = 0.37

# case -> (DPOModule settings, the terms they select, {what a module ignoring a setting would compute instead}).
CASES: dict[str, tuple[dict, Terms, dict[str, Terms]]] = {
    "beta": (
        dict(loss_type="sigmoid", beta=BETA),
        [(1.0, "sigmoid", dict(beta=BETA))],
        {"beta 0.1": [(1.0, "sigmoid", dict(beta=0.1))]},
    ),
    "label_smoothing-robust": (
        dict(loss_type="robust", beta=BETA, label_smoothing=0.1),
        [(1.0, "robust", dict(beta=BETA, label_smoothing=0.1))],
        {"no smoothing": [(1.0, "robust", dict(beta=BETA))], "beta 0.1": [(1.0, "robust", dict(beta=0.1))]},
    ),
    "label_smoothing-cdpo": (
        dict(loss_type="sigmoid", beta=BETA, label_smoothing=0.1),
        [(1.0, "sigmoid", dict(beta=BETA, label_smoothing=0.1))],
        {"no smoothing": [(1.0, "sigmoid", dict(beta=BETA))]},
    ),
    "loss_weights": (
        dict(loss_type=["sigmoid", "sft"], loss_weights=[0.7, 1.3], beta=BETA),
        [(0.7, "sigmoid", dict(beta=BETA)), (1.3, "sft", dict(beta=BETA))],
        {"weights 1, 1": [(1.0, "sigmoid", dict(beta=BETA)), (1.0, "sft", dict(beta=BETA))]},
    ),
    "discopop_tau": (
        dict(loss_type="discopop", beta=BETA, loss_kwargs={"discopop_tau": 0.2}),
        [(1.0, "discopop", dict(beta=BETA, discopop_tau=0.2))],
        {"default tau 0.05": [(1.0, "discopop", dict(beta=BETA))]},
    ),
    "simpo_gamma": (  # reference-free: the module runs with reference "none"
        dict(loss_type="simpo", beta=2.5, label_smoothing=0.1, loss_kwargs={"simpo_gamma": 0.8}),
        [(1.0, "simpo", dict(beta=2.5, label_smoothing=0.1, simpo_gamma=0.8))],
        {
            "default gamma 0.5": [(1.0, "simpo", dict(beta=2.5, label_smoothing=0.1))],
            "no smoothing": [(1.0, "simpo", dict(beta=2.5, simpo_gamma=0.8))],
        },
    ),
    "cpo_alpha": (
        dict(loss_type="cpo", beta=BETA, loss_kwargs={"cpo_alpha": 0.4}),
        [(1.0, "cpo", dict(beta=BETA, cpo_alpha=0.4))],
        {"default alpha 1": [(1.0, "cpo", dict(beta=BETA))]},
    ),
}


def combine(terms: Terms, pair: PairLogps) -> LossOutput:
    """sum_k w_k * LOSSES[name_k](pair, **kwargs_k).losses; the rewards of the first term (as TRL logs them)."""
    outs = [(w, LOSSES[name](pair, **kwargs)) for w, name, kwargs in terms]
    losses = sum(w * out.losses for w, out in outs)
    return LossOutput(losses, outs[0][1].chosen_rewards, outs[0][1].rejected_rewards)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_settings_reach_the_loss_and_every_logged_metric(case):
    """Per pair: losses and rewards of the module's forward == the pure functions' with the same settings on
    independently computed log-probs. Logged (one validation batch of 4 pairs): loss, rewards/* and logps/*
    are means over the pairs, accuracies the fraction with chosen reward > rejected, margins the mean of
    chosen - rejected rewards, logits/* the sum of per-token mean logits over all response tokens of a side
    divided by their count."""
    settings, terms, ignored = CASES[case]
    torch.manual_seed(0)
    module = DPOModule(model_config=tiny_config("llama"), **settings)
    perturb_(module.model, seed=1)
    batch = random_batch(b=B, t=10, seed=3)

    logps, tokens, logits_sum = hand_logps(module.model, batch)  # (2B,) each, chosen first
    entropy_sum, correct = hand_token_stats(module.model, batch)  # (2B,) each
    ref = None if module.ref_model is None else hand_logps(module.ref_model, batch)[0]
    pair = PairLogps(
        chosen=logps[:B], rejected=logps[B:], ref_chosen=None if ref is None else ref[:B],
        ref_rejected=None if ref is None else ref[B:], chosen_tokens=tokens[:B], rejected_tokens=tokens[B:],
    )
    want = combine(terms, pair)
    for what, alternative in ignored.items():  # the setting matters for this batch
        alt = combine(alternative, pair)
        gap = max((alt.losses - want.losses).abs().max(), (alt.chosen_rewards - want.chosen_rewards).abs().max())
        assert gap > 1e-3, f"{what} gives the same numbers: the test could not notice it"

    out = module(batch)
    torch.testing.assert_close(out.policy.logps.detach(), logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.losses.detach(), want.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.chosen_rewards, want.chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.rejected_rewards, want.rejected_rewards, rtol=1e-5, atol=1e-5)

    cr, rr = want.chosen_rewards, want.rejected_rewards
    expected = {
        "val/loss": want.losses.mean(),
        "val/rewards/chosen": cr.mean(),
        "val/rewards/rejected": rr.mean(),
        "val/rewards/accuracies": (cr > rr).float().mean(),
        "val/rewards/margins": (cr - rr).mean(),
        "val/logps/chosen": logps[:B].mean(),
        "val/logps/rejected": logps[B:].mean(),
        "val/logits/chosen": logits_sum[:B].sum() / tokens[:B].sum(),
        "val/logits/rejected": logits_sum[B:].sum() / tokens[B:].sum(),
        # TRL's: entropy over every response token of both sides, token accuracy over the chosen side's
        "val/entropy": entropy_sum.sum() / tokens.sum(),
        "val/mean_token_accuracy": correct[:B].sum() / tokens[:B].sum(),
    }
    expected = {k: float(v) for k, v in expected.items()}
    assert list(expected) == [f"val/{n}" for n in METRIC_NAMES]
    for side in ("rewards", "logps", "logits"):  # the sides differ, so swapping them would show
        assert abs(expected[f"val/{side}/chosen"] - expected[f"val/{side}/rejected"]) > 1e-3, side
    assert_logged(validate(module, batch), expected)


# ---------------------------------------------------------------------------------------------- KTO


def kto_features(n: int = B, seed: int = 5) -> list[dict]:
    """n unpaired examples of random tokens: rows of 6-10 tokens, prompts of 2-4, desirable alternating."""
    g = torch.Generator().manual_seed(seed)
    features = []
    for i in range(n):
        length = int(torch.randint(6, 11, (1,), generator=g))
        start = int(torch.randint(2, 5, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        features.append({"input_ids": ids, "response_start": start, "desirable": i % 2 == 0})
    return features


def kl_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
            "labels": batch["kl_labels"]}


def kto_module(**settings) -> KTOModule:
    torch.manual_seed(0)
    module = KTOModule(model_config=tiny_config("llama"), **settings)
    # The reference, not the policy, is moved: a random-init policy is near uniform, so a perturbed
    # reference scores the mismatched rows lower and the KL estimate z0 comes out > 0 (not clamped to 0).
    perturb_(module.ref_model, seed=2)
    return module


def kto_expected(module: KTOModule, batch: dict[str, Tensor], out, real: slice) -> dict[str, float]:
    """KTOMetrics' values for the ``real`` rows of one batch: means over those rows, per side."""
    policy = hand_logps(module.model, batch)[0][real]
    desirable = batch["desirable"][real]
    rewards, losses = out.rewards[real], out.losses[real]
    return {
        "val/loss": float(losses.mean()),
        "val/rewards/chosen": float(rewards[desirable].mean()),
        "val/rewards/rejected": float(rewards[~desirable].mean()),
        "val/rewards/margins": float(rewards[desirable].mean() - rewards[~desirable].mean()),
        "val/logps/chosen": float(policy[desirable].mean()),
        "val/logps/rejected": float(policy[~desirable].mean()),
    }


def test_kto_settings_reach_the_loss_and_every_logged_metric():
    """beta 0.37, desirable_weight 1.5, undesirable_weight 0.6. z0 = max(0, mean over the 4 mismatched KL
    rows of policy - reference log-prob), computed by hand; losses and rewards == ``losses.kto_loss`` with
    those settings; val/kl == z0 and the other val/* metrics are means over the desirable (chosen) or
    undesirable (rejected) examples."""
    settings = dict(beta=0.37, desirable_weight=1.5, undesirable_weight=0.6)
    module = kto_module(**settings)
    batch = KTOCollator(pad_token_id=0)(kto_features())
    assert batch["desirable"].tolist() == [True, False, True, False] and "weight" not in batch

    policy, ref = hand_logps(module.model, batch)[0], hand_logps(module.ref_model, batch)[0]
    ratios = hand_logps(module.model, kl_rows(batch))[0] - hand_logps(module.ref_model, kl_rows(batch))[0]
    z0 = ratios.mean().clamp(min=0)
    assert z0 > 0.1  # the clamp is not what makes z0 agree
    want = kto_loss(policy, ref, batch["desirable"], z0, **settings)
    for ignored in (dict(beta=0.1), dict(beta=0.37), dict(beta=0.37, desirable_weight=1.5),
                    dict(beta=0.37, undesirable_weight=0.6)):  # each setting matters for this batch
        alt = kto_loss(policy, ref, batch["desirable"], z0, **ignored)
        gap = max((alt.losses - want.losses).abs().max(), (alt.rewards - want.rewards).abs().max())
        assert gap > 1e-3, ignored

    out, policy_out, z0_out = module(batch)
    assert float(z0_out) == pytest.approx(float(z0), **TOL)
    torch.testing.assert_close(policy_out.logps.detach(), policy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses.detach(), want.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rewards, want.rewards, rtol=1e-5, atol=1e-5)

    expected = {"val/kl": float(z0), **kto_expected(module, batch, want, slice(None))}
    expected = {f"val/{n}": expected[f"val/{n}"] for n in KTO_METRIC_NAMES}
    assert_logged(validate(module, batch), expected)


def test_kto_eval_padding_row_stays_out_of_z0_and_the_metrics():
    """An eval batch from an uneven shard: 4 real examples and a repeat of example 0 flagged as padding
    (weight 0), as ``PaddedEvalSampler`` pads. The collator builds 5 KL rows; z0 must be the mean of the 4
    real ones (row i: prompt i + completion i+1; row 3 pairs prompt 3 with the padding's completion, which is
    example 0's, and is real). Row 4 (the padding: prompt 0 + completion 0, example 0 itself) is left out:
    z0 = max(0, (r0 + r1 + r2 + r3) / 4), not (r0 + ... + r4) / 5. val/loss and the other metrics are means
    over the 4 real examples, with that z0."""
    settings = dict(beta=0.37, desirable_weight=1.5, undesirable_weight=0.6)
    module = kto_module(**settings)
    features = [{**f, "padding": False} for f in kto_features()]
    batch = KTOCollator(pad_token_id=0)([*features, {**features[0], "padding": True}])
    assert batch["weight"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]

    ratios = hand_logps(module.model, kl_rows(batch))[0] - hand_logps(module.ref_model, kl_rows(batch))[0]  # (5,)
    z0 = ratios[:B].sum().div(B).clamp(min=0)
    assert z0 > 0.1 and abs(float(ratios.mean() - z0)) > 1e-2  # counting the padding would move z0

    out, _, z0_out = module(batch)
    assert float(z0_out) == pytest.approx(float(z0), **TOL)
    policy, ref = hand_logps(module.model, batch)[0], hand_logps(module.ref_model, batch)[0]
    want = kto_loss(policy, ref, batch["desirable"], z0, **settings)
    torch.testing.assert_close(out.losses.detach(), want.losses, rtol=1e-5, atol=1e-5)

    expected = {"val/kl": float(z0), **kto_expected(module, batch, want, slice(0, B))}
    expected = {f"val/{n}": expected[f"val/{n}"] for n in KTO_METRIC_NAMES}
    assert_logged(validate(module, batch), expected)
