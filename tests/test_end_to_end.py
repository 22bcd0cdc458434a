"""PreferenceDataModule + DPOModule: a few steps end to end on CPU, as in the README snippet.

Every logged value is checked against the same quantity written out here, from the models' plain
logits (``log_softmax`` over the full vocabulary, not ``models/logprobs.py``'s chunked path), so a metric
fed from the wrong side, a reference that moved, or a wrongly reduced loss fails a test.
"""

import copy
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dpo_lightning import DPOModule
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data.synthetic import generate_pairs

from tiny import tiny_config

BETA = 0.1  # DPOModule's default


def _data(tmp_path, collator: str = "pad") -> PreferenceDataModule:
    """Padded rows by default: the expected metrics below are written out for them (``plain_logps``);
    the default (packed rows) is checked against them in the last test."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in generate_pairs(64, seed=3)))
    return PreferenceDataModule(
        tokenizer="synthetic:sort", dataset=str(path), val_fraction=0.25, max_length=32, batch_size=4, seed=1,
        collator=collator,
    )


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


def plain_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a ``(2B, T)`` batch: (sum of log p(label), response tokens, sum of the mean logit), each (2B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logits = logits[:, :-1].float()  # (2B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (2B, T-1)
    mask = labels != -100
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token_logps * mask).sum(1), mask.sum(1).float(), (logits.mean(-1) * mask).sum(1)


def plain_token_stats(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a ``(2B, T)`` batch: (sum over response tokens of the entropy -sum p log p, the response
    tokens whose label is the argmax), each (2B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]  # (2B, T-1)
    mask = labels != -100
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * torch.log(p)).sum(-1)  # (2B, T-1)
    hits = (logits.argmax(-1) == labels) & mask
    return (entropy * mask).sum(1), hits.sum(1).float()


def dpo_metrics(policy, reference, batches, prefix: str) -> dict[str, float]:
    """The sigmoid-DPO metrics over every pair of ``batches``, written out:

    r_c = beta * (logp_c - ref_c), r_r = beta * (logp_r - ref_r), loss = -log sigmoid(r_c - r_r),
    all means over pairs, except logits/* = (sum of logit sums) / (sum of response tokens) per side,
    entropy = (sum of entropies) / (response tokens of both sides), mean_token_accuracy = (argmax hits) /
    (response tokens) of the chosen side.
    """
    cols = {k: [] for k in ("loss", "rc", "rr", "lc", "lr", "sc", "sr", "nc", "nr", "ent", "hits")}
    with torch.no_grad():
        for batch in batches:
            logps, tokens, logit_sums = plain_logps(policy, batch)
            entropy, hits = plain_token_stats(policy, batch)
            ref, _, _ = plain_logps(reference, batch)
            b = logps.shape[0] // 2
            rc, rr = BETA * (logps[:b] - ref[:b]), BETA * (logps[b:] - ref[b:])
            for k, v in (("loss", -F.logsigmoid(rc - rr)), ("rc", rc), ("rr", rr), ("lc", logps[:b]),
                         ("lr", logps[b:]), ("sc", logit_sums[:b]), ("sr", logit_sums[b:]),
                         ("nc", tokens[:b]), ("nr", tokens[b:]), ("ent", entropy), ("hits", hits[:b])):
                cols[k].append(v)
    c = {k: torch.cat(v).double() for k, v in cols.items()}
    values = {
        "loss": c["loss"].mean(),
        "rewards/chosen": c["rc"].mean(),
        "rewards/rejected": c["rr"].mean(),
        "rewards/accuracies": (c["rc"] > c["rr"]).double().mean(),
        "rewards/margins": (c["rc"] - c["rr"]).mean(),
        "logps/chosen": c["lc"].mean(),
        "logps/rejected": c["lr"].mean(),
        "logits/chosen": c["sc"].sum() / c["nc"].sum(),
        "logits/rejected": c["sr"].sum() / c["nr"].sum(),
        "entropy": c["ent"].sum() / (c["nc"].sum() + c["nr"].sum()),
        "mean_token_accuracy": c["hits"].sum() / c["nc"].sum(),
    }
    return {f"{prefix}/{k}": v.item() for k, v in values.items()}


def test_datamodule_and_module_fit_a_few_steps(tmp_path):
    """Validation before and after 6 AdamW steps logs exactly the metrics written out in ``dpo_metrics``,
    with the initial policy (kept aside before training) as the reference. Before training policy ==
    reference, so every reward and margin is 0, the loss is -log sigmoid(0) = ln 2 and no pair is
    right (ties count as wrong)."""
    data = _data(tmp_path)
    module = DPOModule(
        model_config=tiny_config("llama", vocab_size=data.vocab_size),
        tokenizer=data.tokenizer,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    initial = copy.deepcopy(module.model).eval()
    trainer = _trainer(max_steps=6)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert abs(before["val/loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert before["val/rewards/chosen"] == before["val/rewards/rejected"] == before["val/rewards/margins"] == 0.0
    assert before["val/rewards/accuracies"] == 0.0
    val_batches = list(data.val_dataloader())
    expected = dpo_metrics(initial, initial, val_batches, "val")
    assert before == pytest.approx(expected, rel=1e-5, abs=1e-6)

    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    expected = dpo_metrics(module.model.eval(), initial, val_batches, "val")
    assert after == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Guard against a vacuous pass: training moved the policy off the reference, so the two sides of
    # each metric differ by far more than the tolerance above and a swap would show.
    for side in ("rewards", "logps", "logits"):
        assert abs(expected[f"val/{side}/chosen"] - expected[f"val/{side}/rejected"]) > 1e-4, side
    for name, p in module.ref_model.named_parameters():  # the reference never moved
        torch.testing.assert_close(p, dict(initial.named_parameters())[name], rtol=0, atol=0)
    assert module.model.config.pad_token_id == data.pad_token_id


def test_one_sgd_step_moves_each_policy_weight_by_minus_lr_times_its_gradient(tmp_path):
    """One optimizer step of SGD (lr 0.5, no warmup, constant schedule) on the first shuffled batch.

    At step 0 policy == reference, so m_j = (c_j - ref_c_j) - (r_j - ref_r_j) = 0 for every pair j and
    loss = mean_j -log sigmoid(beta * m_j) = ln 2. Its gradient is computed here by autograd on a copy
    of the initial weights through ``plain_logps`` (the reference held fixed), and every policy weight
    must end at w - 0.5 * grad (a weight with no gradient stays put); the reference must not move.
    The metrics logged for that step: loss ln 2, rewards and margins 0, accuracy 0, and logps/* and
    logits/* of the batch as written out in ``dpo_metrics``.
    """
    lr = 0.5
    data = _data(tmp_path)
    module = DPOModule(
        model_config=tiny_config("llama", vocab_size=data.vocab_size),
        tokenizer=data.tokenizer,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        warmup_ratio=0.0,
        lr_decay="constant",
    )
    initial = copy.deepcopy(module.model)
    seen = []

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({k: v.clone() for k, v in batch.items()})

    trainer = _trainer(max_steps=1, limit_val_batches=0, log_every_n_steps=1, callbacks=[Capture()])
    trainer.fit(module, datamodule=data)
    assert len(seen) == 1
    batch = seen[0]

    model = copy.deepcopy(initial)
    logps, _, _ = plain_logps(model, batch)
    with torch.no_grad():
        ref, _, _ = plain_logps(initial, batch)
    b = logps.shape[0] // 2
    margins = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])  # (B,) all 0 at step 0
    loss = -F.logsigmoid(BETA * margins).mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()

    trained = dict(module.model.named_parameters())
    largest_step = 0.0
    for name, w in model.named_parameters():
        grad = torch.zeros_like(w) if w.grad is None else w.grad
        torch.testing.assert_close(trained[name], (w - lr * grad).detach(), rtol=0, atol=1e-6, msg=name)
        largest_step = max(largest_step, (lr * grad).abs().max().item())
    assert largest_step > 1e-3  # the update is far above the tolerance: a real step was checked
    for name, p in module.ref_model.named_parameters():
        torch.testing.assert_close(p, dict(initial.named_parameters())[name], rtol=0, atol=0)

    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    # The step's learning rate and pre-clipping gradient norm ride along with the metric window.
    assert logged.pop("train/lr") == pytest.approx(lr)
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert logged.pop("train/grad_norm") == pytest.approx(grad_norm.item(), rel=1e-5)
    assert logged.pop("train/num_tokens") == int(batch["attention_mask"].sum())  # one step's input tokens
    assert logged == pytest.approx(dpo_metrics(initial, initial, [batch], "train"), rel=1e-5, abs=1e-6)
    assert logged["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged["train/rewards/margins"] == logged["train/rewards/accuracies"] == 0.0


def test_the_default_fast_path_trains_as_the_padded_full_logits_path(tmp_path, caplog):
    """Defaults (``collator: auto`` -> prefix-shared packed rows, ``lean_logprobs`` None -> lean) against padded
    rows with full logits: the same validation metrics, tokens counted and weights after 4 AdamW steps (fp32,
    1e-5), and the run says which path it took."""
    import logging

    runs = {}
    for name, collator, lean in (("fast", "auto", None), ("plain", "pad", False)):
        torch.manual_seed(0)
        (tmp_path / name).mkdir()
        data = _data(tmp_path / name, collator=collator)
        module = DPOModule(
            model_config=tiny_config("llama", vocab_size=data.vocab_size), tokenizer=data.tokenizer,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), memory={"lean_logprobs": lean},
        )
        trainer = _trainer(max_steps=4, limit_val_batches=2)
        with caplog.at_level(logging.INFO):
            trainer.fit(module, datamodule=data)
        tokens = module._tokens_seen  # train/num_tokens on one process
        runs[name] = (trainer.validate(module, datamodule=data, verbose=False)[0], module.model.state_dict(), data)
        runs[name] += (tokens,)
    (fast, fast_w, fast_data, fast_tokens), (plain, plain_w, _, plain_tokens) = runs["fast"], runs["plain"]
    assert fast_data.collator_name == "share"
    assert fast_tokens == plain_tokens > 0  # the prompt counted on both sides, as the padded rows hold it
    assert "batches: share" in caplog.text and "log-probs: lean" in caplog.text
    assert "batches: pad (data.collator)" in caplog.text
    assert "full logits (model.memory.lean_logprobs: false)" in caplog.text
    assert fast == pytest.approx(plain, rel=1e-5, abs=1e-6)
    for key, value in plain_w.items():
        torch.testing.assert_close(fast_w[key], value, rtol=1e-5, atol=1e-6)
