"""Our losses and log-probs against TRL 1.x's own code (skipped when TRL is not installed).

TRL computes every ``loss_type`` inline in ``DPOTrainer._compute_loss``. Rather than copy it, we call that
method unbound on a small stand-in for the trainer (only the attributes it reads) with a stand-in model
whose fused-head output carries per-token log-probs we choose. Both sides then see the same per-sequence
log-probs; we compare TRL's scalar loss with the mean of our per-pair losses, the gradients with respect to
the per-sequence log-probs (which pins every pair's term, not only the mean) and the logged metrics: ours
go through the real ``PreferenceMetrics.update`` and ``compute``, fed as ``DPOModule`` feeds them.

The log-probs, response-token counts and logit sums themselves are compared through TRL's real fused LM
head on tiny random models.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.trl
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from dpo_lightning.losses import PairLogps, compute_loss  # noqa: E402
from dpo_lightning.models.loading import load_causal_lm  # noqa: E402
from dpo_lightning.models.logprobs import sequence_logps  # noqa: E402
from dpo_lightning.training.metrics import METRIC_NAMES, PreferenceMetrics  # noqa: E402

from tiny import random_batch, tiny_config  # noqa: E402

B, T, BETA = 5, 9, 0.1
PROMPT = 3  # >= 1, so TRL's unshifted completion counts equal our shifted ones (see _inputs)

# (loss_type list, loss_weights, label_smoothing): every loss both libraries implement, plus RPO.
CASES = [
    (["sigmoid"], None, 0.0),
    (["hinge"], None, 0.0),
    (["ipo"], None, 0.0),
    (["exo_pair"], None, 1e-3),
    (["nca_pair"], None, 0.0),
    (["robust"], None, 0.0),
    (["robust"], None, 0.2),
    (["bco_pair"], None, 0.0),
    (["sppo_hard"], None, 0.0),
    (["aot"], None, 0.0),
    (["aot"], None, 0.1),
    (["aot_unpaired"], None, 0.0),
    (["aot_unpaired"], None, 0.1),
    (["apo_zero"], None, 0.0),
    (["apo_down"], None, 0.0),
    (["discopop"], None, 0.0),
    (["sft"], None, 0.0),
    (["sigmoid_norm"], None, 0.0),
    (["sigmoid", "sft"], [1.0, 0.7], 0.0),  # RPO: sigmoid + alpha * NLL
    (["sigmoid", "ipo", "bco_pair"], [0.5, 0.3, 0.2], 0.0),
]


class _FakeAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def unwrap_model(model):
        return model


class _FusedHeadStub(torch.nn.Module):
    """Stands in for a model patched by ``add_fused_lm_head``: returns the per-token log-probs it is given."""

    def __init__(self, per_token_logps: torch.Tensor, mean_logits: torch.Tensor | None = None,
                 entropy: torch.Tensor | None = None, is_top1: torch.Tensor | None = None) -> None:
        super().__init__()
        shape = per_token_logps.shape  # (2B, T - 1)
        self.per_token_logps = per_token_logps
        self.mean_logits = torch.zeros(shape) if mean_logits is None else mean_logits
        self.entropy = torch.zeros(shape) if entropy is None else entropy
        self.is_top1 = torch.zeros(shape, dtype=torch.bool) if is_top1 is None else is_top1

    def forward(self, *, labels, fused_lm_head, **_):
        assert fused_lm_head
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=self.entropy, mean_logits=self.mean_logits,
                               is_top1=self.is_top1)


def _inputs(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A collated TRL batch (prompt of PROMPT tokens, responses of 1..T-PROMPT tokens) and its completion mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T - PROMPT + 1, (2 * B,), generator=g)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    attention = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion[row, PROMPT : PROMPT + n] = 1
        attention[row, : PROMPT + n] = 1
    inputs = {
        "input_ids": torch.randint(1, 50, (2 * B, T), generator=g) * attention,
        "attention_mask": attention,
        "completion_mask": completion,
    }
    return inputs, completion


def _trl_loss(loss_types, loss_weights, label_smoothing, inputs, logps, ref_logps, mean_logits=None, entropy=None,
              is_top1=None):
    """TRL's ``_compute_loss`` on per-sequence log-probs ``logps`` (2B,) -> (loss, metrics).

    ``mean_logits``, ``entropy``, ``is_top1`` (2B, T-1): the per-token mean logit, entropy and argmax hit the
    model reports (TRL's ``logits/*``, ``entropy``, ``mean_token_accuracy``); zeros if None.
    """
    shift_mask = inputs["completion_mask"][:, 1:]  # (2B, T-1)
    first = torch.zeros_like(shift_mask, dtype=logps.dtype)
    first[torch.arange(2 * B), shift_mask.argmax(dim=1)] = 1.0  # put each sequence's log-prob on its first token
    per_token = first * logps[:, None]  # (2B, T-1), sums to logps per row
    model = _FusedHeadStub(per_token, mean_logits, entropy, is_top1).train()
    trainer = SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=_FakeAccelerator(),
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        beta=BETA,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        label_smoothing=label_smoothing,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    batch = {**inputs, "ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("loss_types", "loss_weights", "label_smoothing"), CASES)
def test_loss_value_gradient_and_metrics_match_trl(loss_types, loss_weights, label_smoothing):
    inputs, completion = _inputs(seed=len(loss_types) + int(label_smoothing * 100))
    g = torch.Generator().manual_seed(1)
    n_tokens = completion[:, 1:].sum(dim=1).double()  # (2B,) predicted response tokens, what models/logprobs.py counts
    base = -n_tokens * (1.0 + torch.rand(2 * B, generator=g, dtype=torch.float64))
    ref = base + torch.randn(2 * B, generator=g, dtype=torch.float64)
    ours_in = base.clone().requires_grad_(True)
    trl_in = base.clone().requires_grad_(True)
    # Per-token mean logits, different on every token; TRL reads them only at response positions.
    mean_logits = torch.randn(2 * B, T - 1, generator=g, dtype=torch.float64)  # (2B, T-1)
    logits_sum = (mean_logits * completion[:, 1:]).sum(dim=1)  # (2B,) what models/logprobs.py reports per sequence
    # Per-token entropies and argmax hits, also different everywhere; TRL reads them on response tokens (entropy:
    # both sides; accuracy: the chosen side).
    entropy = 3.0 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)  # (2B, T-1)
    is_top1 = torch.rand(2 * B, T - 1, generator=g) < 0.4  # (2B, T-1)
    entropy_sum = (entropy * completion[:, 1:]).sum(dim=1)  # (2B,)
    n_correct = (is_top1 & completion[:, 1:].bool()).sum(dim=1).double()  # (2B,)

    trl_loss, trl_metrics = _trl_loss(loss_types, loss_weights, label_smoothing, inputs, trl_in, ref, mean_logits,
                                      entropy, is_top1)
    out = compute_loss(
        loss_types,
        PairLogps(ours_in[:B], ours_in[B:], ref[:B], ref[B:], n_tokens[:B], n_tokens[B:]),
        beta=BETA,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
    )
    ours_loss = out.losses.mean()
    torch.testing.assert_close(ours_loss, trl_loss, rtol=0, atol=1e-6)

    (trl_grad,) = torch.autograd.grad(trl_loss, trl_in)
    (ours_grad,) = torch.autograd.grad(ours_loss, ours_in)
    torch.testing.assert_close(ours_grad, trl_grad, rtol=0, atol=1e-6)

    # Our logged metrics through the real metric class, fed as DPOModule._shared_step feeds it.
    metrics = PreferenceMetrics("train")
    metrics.update(
        losses=out.losses,
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        chosen_logps=ours_in[:B],
        rejected_logps=ours_in[B:],
        chosen_logits_sum=logits_sum[:B],
        rejected_logits_sum=logits_sum[B:],
        chosen_tokens=n_tokens[:B],
        rejected_tokens=n_tokens[B:],
        entropy_sum=entropy_sum,
        chosen_correct=n_correct[:B],
    )
    ours_metrics = {name.removeprefix("train/"): v.item() for name, v in metrics.compute().items()}
    assert list(ours_metrics) == list(METRIC_NAMES)
    # TRL's trainer logs the loss itself; every other name is in TRL's _metrics. float32 sums on our side.
    expected = {"loss": trl_loss.item(), **{n: trl_metrics[n] for n in METRIC_NAMES if n != "loss"}}
    assert ours_metrics == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # Guard against a vacuous pass: the two sides of each statistic differ, so a swap would fail; the
    # accuracy over the chosen tokens differs from the one over both sides.
    for side in ("rewards", "logps", "logits"):
        assert abs(expected[f"{side}/chosen"] - expected[f"{side}/rejected"]) > 1e-3, side
    assert abs(expected["mean_token_accuracy"] - n_correct.sum().item() / n_tokens.sum().item()) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_logps_match_trl_fused_head(arch):
    """TRL 1.x scores response tokens with its own chunked LM head; the per-sequence sums must agree:
    log-probs, response-token counts, the logit sums behind ``logits/*``, and the entropies and argmax hits
    behind ``entropy`` and ``mean_token_accuracy``."""
    model = load_causal_lm(None, config=tiny_config(arch)).eval()
    batch = random_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # A random model seldom predicts a label: make every other response target its argmax (labels are
        # only targets here), so the accuracy compared is not all zeros.
        hit = torch.zeros_like(batch["labels"], dtype=torch.bool)
        hit[:, 1::2] = batch["labels"][:, 1::2] != -100
        batch["labels"][hit] = torch.cat([logits.argmax(-1)[:, :-1], logits.new_zeros(len(logits), 1).long()], 1)[
            torch.roll(hit, -1, 1)]
        ours = sequence_logps(logits, batch["labels"])
        add_fused_lm_head(model, outputs=("log_probs", "mean_logits", "entropy", "is_top1"))
        fused = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            fused_lm_head=True,
        )
    torch.testing.assert_close(ours.logps, fused.log_probs.sum(dim=1), rtol=0, atol=1e-5)
    # TRL reports 0 at non-response positions; the mask is what its trainer applies as well.
    response = (batch["labels"][:, 1:] != -100).float()  # (2B, T-1)
    torch.testing.assert_close(ours.n_tokens, response.sum(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(ours.logits_sum, (fused.mean_logits * response).sum(dim=1), rtol=0, atol=1e-5)
    # entropy and mean_token_accuracy: TRL's per-token entropy and argmax hits, summed per sequence
    torch.testing.assert_close(ours.entropy_sum, (fused.entropy * response).sum(dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.n_correct, (fused.is_top1 * response).sum(dim=1), rtol=0, atol=0)
    assert ours.n_correct.sum() > 0 and (ours.entropy_sum > 0).all()


def test_sigmoid_label_smoothing_is_cdpo_where_trl_ignores_it():
    """A known, documented difference: TRL 1.x ignores ``label_smoothing`` for ``sigmoid``; we apply cDPO."""
    inputs, completion = _inputs(seed=3)
    n_tokens = completion[:, 1:].sum(dim=1).double()
    logps = -2.0 * n_tokens
    ref = logps + torch.linspace(-1, 1, 2 * B, dtype=torch.float64)
    pair = PairLogps(logps[:B], logps[B:], ref[:B], ref[B:], n_tokens[:B], n_tokens[B:])
    trl_loss, _ = _trl_loss(["sigmoid"], None, 0.1, inputs, logps.clone(), ref)
    plain = compute_loss("sigmoid", pair, beta=BETA).losses.mean()
    cdpo = compute_loss("sigmoid", pair, beta=BETA, label_smoothing=0.1).losses.mean()
    torch.testing.assert_close(plain, trl_loss, rtol=0, atol=1e-6)
    assert not torch.allclose(cdpo, trl_loss)
