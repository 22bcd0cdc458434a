"""Reference strategies (copy, adapter, precomputed, none), TR-DPO, and KTO through DPOModule."""

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dpo_lightning import CopyReference, DPOModule, KTOModule, LoraOptions, MemoryOptions, PrecomputedReference
from dpo_lightning.data import KTODataModule, PreferenceDataModule
from dpo_lightning.data.synthetic import generate_pairs
from dpo_lightning.losses import kto_loss
from dpo_lightning.references import mix_into_reference_

from tiny import ListLogger, random_batch, tiny_config


def trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kw})


def test_adapter_reference_equals_a_separately_loaded_frozen_base(tmp_path):
    base = DPOModule(model_config=tiny_config("llama")).model
    base.save_pretrained(tmp_path / "base")
    module = DPOModule(
        model=str(tmp_path / "base"), reference="adapter",
        lora=LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    assert module.ref_model is None  # one set of base weights
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer(max_steps=3).fit(module, DataLoader([random_batch(seed=i) for i in range(3)], batch_size=None))
    batch = random_batch(seed=9)
    frozen = DPOModule(model=str(tmp_path / "base")).model.eval()
    with torch.no_grad():
        expected = module.sequence_logps(frozen, batch).logps
        policy = module.sequence_logps(module.model, batch).logps
    torch.testing.assert_close(module.reference_logps(batch), expected, rtol=0, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-4  # the adapters did train

    # Export: merged into a plain model, or the adapter alone on top of the base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_lightning.stages.export import export_hf

    ids = batch["input_ids"][:2]
    with torch.no_grad():
        want = module.model(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(export_hf(module.model, None, tmp_path / "merged")).eval()
    export_hf(module.model, None, tmp_path / "adapter", adapter="adapter")
    adapter = PeftModel.from_pretrained(frozen, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapter(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert any("lora_" in n for n, _ in module.model.named_parameters())  # the module kept its adapters


def _datamodule(path, cls=PreferenceDataModule, **kw) -> PreferenceDataModule | KTODataModule:
    return cls(
        tokenizer="synthetic:sort", dataset=str(path), val_fraction=0.25, max_length=32, batch_size=4, seed=1, **kw
    )


class CountForwards(torch.nn.Module):
    calls = 0


def test_precomputed_equals_live_is_cached_and_frees_the_reference(tmp_path, monkeypatch):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(32, seed=5)))
    cache = tmp_path / "cache"

    def module(**kw):
        torch.manual_seed(0)  # the same random-init policy (and so reference) each time
        return DPOModule(
            model_config=tiny_config("llama", vocab_size=16), reference=PrecomputedReference(cache_dir=str(cache)),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kw,
        )

    first, data = module(), _datamodule(path)
    live_ref = first.ref_model
    resident = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            resident.append(sum(p.numel() for p in pl_module.parameters()))
            # precomputed == live reference log-probs on this very batch
            with torch.no_grad():
                live = pl_module.sequence_logps(live_ref, batch).logps
            torch.testing.assert_close(batch["ref_logps"], live, rtol=0, atol=1e-5)

    trainer(max_steps=3, callbacks=[Probe()]).fit(first, datamodule=data)
    policy_params = sum(p.numel() for p in first.model.parameters())
    assert first.ref_model is None and resident == [policy_params] * 3
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2  # train and validation

    # A second run reuses the cache: computing is never called.
    import dpo_lightning.references.precomputed as module_mod

    def boom(*a, **k):
        raise AssertionError("recomputed despite a valid cache")

    monkeypatch.setattr(module_mod, "compute_reference_logps", boom)
    trainer(max_steps=1).fit(module(), datamodule=_datamodule(path))
    monkeypatch.undo()

    # Changed tokenization, data or weights: new cache entries.
    trainer(max_steps=1).fit(module(), datamodule=_datamodule(path, max_prompt_length=8))
    assert len(list(cache.glob("*.pt"))) == 4
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(32, seed=6)))
    trainer(max_steps=1).fit(module(), datamodule=_datamodule(path))
    assert len(list(cache.glob("*.pt"))) == 6
    torch.manual_seed(1)
    other = DPOModule(
        model_config=tiny_config("llama", vocab_size=16), reference=PrecomputedReference(cache_dir=str(cache))
    )
    trainer(max_steps=1).fit(other, datamodule=_datamodule(path))
    assert len(list(cache.glob("*.pt"))) == 8


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_validates_and_resumes_exactly(tmp_path, monkeypatch, lora):
    """Validation every 2 steps after the precompute pass: it used to crash at the first one (restoring
    float32 buffers into the reference the pass had freed: "`ref_model` is not an nn.Module"). A checkpoint
    at each validation; the resume from step 2 takes the reference log-probs from the checkpoint (no second
    pass) and ends bitwise equal, its train and validation logs too."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(32, seed=5)))  # 24 train, 8 validation

    def module() -> DPOModule:
        torch.manual_seed(0)
        return DPOModule(model_config=tiny_config("llama", vocab_size=16), tokenizer="synthetic:sort",
                         reference=PrecomputedReference(cache_dir=str(tmp_path / "cache")),
                         lora=LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    def fit(callbacks: list, ckpt=None) -> tuple[DPOModule, ListLogger]:
        policy, logs = module(), ListLogger(prefixes=("train/", "val/"))
        trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=logs, log_every_n_steps=1,
                enable_checkpointing=bool(callbacks), callbacks=callbacks).fit(
            policy, datamodule=_datamodule(path), ckpt_path=ckpt)
        return policy, logs

    straight, logs = fit([ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}")])
    assert straight.ref_model is None
    assert [s for s, row in sorted(logs.rows.items()) if "val/loss" in row] == [2, 4]  # optimizer steps 2, 4

    import dpo_lightning.references.precomputed as reference_module

    def boom(*a, **k):
        raise AssertionError("the resumed run computed the reference log-probs again")

    monkeypatch.setattr(reference_module, "compute_reference_logps", boom)
    resumed, resumed_logs = fit([], ckpt=tmp_path / "ckpt" / "step=2.ckpt")
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert resumed_logs.rows == {s: row for s, row in logs.rows.items() if s > 2}  # after the checkpoint of step 2


def plain_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a ``(2B, T)`` batch, by plain ``log_softmax`` (not models/logprobs.py):
    (sum of log p(label), tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]  # (2B, T-1): position t predicts token t+1
    mask = labels != -100
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token_logps * mask).sum(1), mask.sum(1).float()


def test_reference_none_for_reference_free_losses():
    """SimPO at DPOModule's defaults (beta 0.1, gamma 0.5), with c, r the policy's summed log-probs and
    Lc, Lr the response lengths, computed here from the plain logits:

        simpo_j = -log sigmoid(0.1 * (c_j / Lc_j - r_j / Lr_j) - 0.5),  rewards 0.1 * c_j / Lc_j, 0.1 * r_j / Lr_j
        simpo + sft (weights 1, 1): simpo_j + (-sum_i c_i / sum_i Lc_i), the NLL over all chosen tokens
    """
    batch = random_batch()
    module = DPOModule(model_config=tiny_config("llama"), loss_type="simpo")
    assert module.hparams.reference == "none" and module.ref_model is None
    out, policy, ref = module(batch)
    assert ref is None
    with torch.no_grad():
        logps, tokens = plain_logps(module.model, batch)
    b = logps.shape[0] // 2
    torch.testing.assert_close(policy.logps.detach(), logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.n_tokens, tokens, rtol=0, atol=0)
    c, r = logps[:b] / tokens[:b], logps[b:] / tokens[b:]  # (B,) mean log-prob per token
    simpo = -torch.nn.functional.logsigmoid(0.1 * (c - r) - 0.5)
    torch.testing.assert_close(out.losses.detach(), simpo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, 0.1 * r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference-free"):
        DPOModule(model_config=tiny_config("llama"), loss_type="sigmoid", reference="none")
    # TRL's SimPO (simpo + cpo_alpha * NLL) needs no reference either.
    both = DPOModule(model_config=tiny_config("llama"), loss_type=["simpo", "sft"], loss_weights=[1.0, 1.0])
    assert both.ref_model is None
    with torch.no_grad():
        logps, tokens = plain_logps(both.model, batch)
    c, r = logps[:b] / tokens[:b], logps[b:] / tokens[b:]
    nll = -logps[:b].sum() / tokens[:b].sum()
    by_hand = -torch.nn.functional.logsigmoid(0.1 * (c - r) - 0.5) + nll
    torch.testing.assert_close(both(batch).loss.losses.detach(), by_hand, rtol=1e-5, atol=1e-6)


def test_tr_dpo_sync_mixes_the_reference_by_hand():
    """alpha = 0.25, sync every 2 steps: after step 2, ref = 0.25 * policy_2 + 0.75 * ref_0."""
    module = DPOModule(
        model_config=tiny_config("llama"), reference=CopyReference(sync_steps=2, sync_alpha=0.25),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5), warmup_ratio=0.0, lr_decay="constant",
    )
    ref0 = {k: v.clone() for k, v in module.ref_model.named_parameters()}
    trainer(max_steps=2).fit(module, DataLoader([random_batch(seed=i) for i in range(2)], batch_size=None))
    for name, p in module.ref_model.named_parameters():
        policy = dict(module.model.named_parameters())[name]
        torch.testing.assert_close(p, 0.25 * policy + 0.75 * ref0[name])
    with pytest.raises(ValueError):
        mix_into_reference_(module.ref_model, module.model, 0.0)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_tr_dpo_with_lora_syncs_the_merged_policy(alpha):
    """TR-DPO with a LoRA policy: the policy is the model it computes, W + (alpha_lora / r) * B @ A on the adapted
    layers. After step 2 (sync every 2), ref = alpha * merged_policy_2 + (1 - alpha) * ref_0, with the merge
    done here by PEFT's merge_and_unload on a copy; the reference's log-probs are that model's, and at
    alpha 1 the LoRA policy's own. It used to fail at the first sync: the reference has no parameter
    'base_model.model.model.embed_tokens.weight'."""
    module = DPOModule(
        model_config=tiny_config("llama"), lora=LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        reference=CopyReference(sync_steps=2, sync_alpha=alpha),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_ratio=0.0, lr_decay="constant",
    )
    ref0 = {k: v.clone() for k, v in module.ref_model.named_parameters()}
    trainer(max_steps=2).fit(module, DataLoader([random_batch(seed=i) for i in range(2)], batch_size=None))
    merged = dict(copy.deepcopy(module.model).merge_and_unload().named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - ref0[q]).abs().max() > 1e-3  # the adapters moved the policy
    expected = copy.deepcopy(module.ref_model)
    for name, p in expected.named_parameters():
        p.data = alpha * merged[name] + (1 - alpha) * ref0[name]
    for name, p in module.ref_model.named_parameters():
        torch.testing.assert_close(p, dict(expected.named_parameters())[name], rtol=0, atol=1e-7)
    assert set(dict(module.ref_model.named_parameters())) == set(ref0)  # still a plain model: no adapters
    batch = random_batch(seed=7)
    module.eval()
    with torch.no_grad():
        reference = module.reference_logps(batch)
        torch.testing.assert_close(reference, module.sequence_logps(expected, batch).logps, rtol=0, atol=1e-5)
        if alpha == 1.0:
            torch.testing.assert_close(reference, module.sequence_logps(module.model, batch).logps, rtol=0, atol=1e-5)


def kto_batch(n=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    kl_ids = torch.cat([ids[:, :4], ids.roll(-1, 0)[:, 4:]], 1)  # prompt i + completion i+1
    kl_labels = kl_ids.clone()
    kl_labels[:, :4] = -100
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "labels": labels, "kl_input_ids": kl_ids,
            "kl_attention_mask": ones, "kl_labels": kl_labels,
            "desirable": torch.tensor([True, False, True, True][:n])}


def test_kto_z0_and_loss_match_a_hand_computation():
    module = KTOModule(model_config=tiny_config("llama"), beta=0.5, undesirable_weight=2.0)
    with torch.no_grad():  # move the policy off the reference so z0 is not trivially 0
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = kto_batch()
    kto, policy, z0 = module.kto_forward(batch)
    kl = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
          "labels": batch["kl_labels"]}
    with torch.no_grad():
        ratios = module.sequence_logps(module.model, kl).logps - module.sequence_logps(module.ref_model, kl).logps
    assert z0.item() == pytest.approx(max(0.0, ratios.mean().item()), abs=1e-6)
    r = (policy.logps - module.sequence_logps(module.ref_model, batch).logps).detach()
    by_hand = [
        (1 - 1 / (1 + math.exp(-0.5 * (r[i] - z0)))) if d else 2.0 * (1 - 1 / (1 + math.exp(-0.5 * (z0 - r[i]))))
        for i, d in enumerate(batch["desirable"].tolist())
    ]
    torch.testing.assert_close(kto.losses, torch.tensor(by_hand, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    ref_kto = kto_loss(policy.logps, r * 0 + (policy.logps - r), batch["desirable"], z0, beta=0.5,
                       undesirable_weight=2.0)
    torch.testing.assert_close(kto.losses, ref_kto.losses)


def test_kto_trains_with_shuffling_through_the_data_module(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(48, seed=7)))
    data = _datamodule(path, KTODataModule)
    module = KTOModule(
        model_config=tiny_config("llama", vocab_size=16), beta=1.0, tokenizer=data.tokenizer,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_ratio=0.0,
    )
    data.setup()
    seen = data.ordered_dataloader("train")  # the (shuffled-in-training) examples, scored in order
    before = trainer().validate(module, dataloaders=seen, verbose=False)[0]
    trainer(max_steps=40).fit(module, datamodule=data)  # shuffled sampler, validation inside fit
    after = trainer().validate(module, dataloaders=seen, verbose=False)[0]
    assert {"val/kl", "val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins"} <= set(after)
    assert before["val/loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) at step 0
    assert after["val/loss"] < before["val/loss"] - 0.05
    assert after["val/rewards/margins"] > 0.5, after


def test_lora_recipe_combination_adapter_checkpointing_lean():
    """recipes/llama7b_lora.yaml's switches together: ln 2 at step 0, gradients on LoRA weights only."""
    module = DPOModule(
        model_config=tiny_config("llama"), reference="adapter", lora=LoraOptions(target_modules="all-linear"),
        memory=MemoryOptions(activation_checkpointing=True, lean_logprobs=True),
    )
    module.configure_model()
    module.train()
    out = module(random_batch()).loss
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)))
    out.losses.mean().backward()
    grads = {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_kto_warns_when_weights_leave_the_papers_range(tmp_path):
    """Balanced data, w_D = 1, w_U = 3: w_D n_D / (w_U n_U) = 1/3, outside [1, 4/3]."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(16, seed=7)))
    data = _datamodule(path, KTODataModule)
    module = KTOModule(model_config=tiny_config("llama", vocab_size=16), undesirable_weight=3.0)
    with pytest.warns(UserWarning, match="weight"):
        trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)


def test_precomputed_reference_with_packed_batches(tmp_path):
    """The packing collator carries the precomputed ref_logps like the padding one (same values), and
    they are the initial policy's log-probs of the padded batch, computed here from its plain logits."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(16, seed=5)))
    batches = {}
    for collator in ("pad", "pack"):
        torch.manual_seed(0)
        module = DPOModule(model_config=tiny_config("llama", vocab_size=16),
                           reference=PrecomputedReference(cache_dir=str(tmp_path / "cache")))
        initial = copy.deepcopy(module.model).eval()  # the reference: the policy before training
        data = _datamodule(path, collator=collator)
        trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
        batches[collator] = next(iter(data.ordered_dataloader("train")))
    torch.testing.assert_close(batches["pack"]["ref_logps"], batches["pad"]["ref_logps"])
    with torch.no_grad():
        expected, _ = plain_logps(initial, batches["pad"])
    torch.testing.assert_close(batches["pad"]["ref_logps"], expected, rtol=0, atol=1e-5)


def test_precomputed_with_max_epochs(tmp_path):
    """max_epochs (no max_steps) builds the train loader before fit starts, to size the LR schedule;
    the precomputed column added at fit start must still reach its batches (it used to fail with
    "the batch carries no ref_logps"), and they hold the initial policy's log-probs."""
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generate_pairs(16, seed=5)))
    torch.manual_seed(0)
    module = DPOModule(model_config=tiny_config("llama", vocab_size=16),
                       reference=PrecomputedReference(cache_dir=str(tmp_path / "cache")))
    initial = copy.deepcopy(module.model).eval()
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                seen.append((batch["ref_logps"], pl_module.sequence_logps(initial, batch).logps))

    trainer(max_epochs=1, limit_val_batches=0, callbacks=[Probe()]).fit(module, datamodule=_datamodule(path))
    assert len(seen) == 3  # 12 training pairs in batches of 4
    for carried, live in seen:
        torch.testing.assert_close(carried, live, rtol=0, atol=1e-5)


@pytest.mark.slow  # six CLI runs
def test_precomputed_reference_validates_and_tests_on_its_own_from_a_checkpoint_and_an_export(tmp_path, monkeypatch):
    """``validate`` and ``test`` outside ``fit`` with ``--model.reference precomputed`` used to fail at their
    first batch ("the batch carries no ref_logps": only ``fit`` ran the pass). Now the split they read is
    precomputed (or read from the cache) after the checkpoint loads:

    - ``validate --ckpt_path`` of the fit's step-2 checkpoint gives the fit's own step-2 validation metrics,
      bitwise (a cache hit on the fit's table), and again with the cache deleted (the pass recomputed);
    - ``test --ckpt_path`` gives what the live ``copy`` reference gives on the same checkpoint;
    - ``validate`` of the export against ``--model.ref_model`` (the initial policy) gives the checkpoint's
      metrics, and without it says that the reference is the evaluated model itself (rewards 0)."""
    from dpo_lightning.cli import cli_main

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(cache))
    rows = generate_pairs(32, seed=5)
    data = tmp_path / "data"
    data.mkdir()
    for split, part in (("train", rows[:16]), ("validation", rows[16:24]), ("test", rows[24:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    initial = tmp_path / "initial"  # a policy on disk, so the export can be compared against it
    torch.manual_seed(0)
    policy = DPOModule(model_config=tiny_config("llama", vocab_size=16), tokenizer="synthetic:sort").model
    policy.save_pretrained(initial)
    common = ["--config", str(root / "recipes" / "tiny.yaml"), "--data.dataset", str(data), "--data.batch_size", "4",
              "--data.eval_batch_size", "4", "--data.test_split", "test", "--model.model_config", "null",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.default_root_dir", str(tmp_path)]  # (without a logger the config is saved there)

    def run(subcommand: str, *args: str) -> dict[str, float]:
        cli = cli_main([subcommand, *common, *args])
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "/" in k}

    fitted = run("fit", "--model.model", str(initial), "--model.reference", "precomputed", "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--checkpoint.save_every_minutes", "null", "--checkpoint.save_top_k", "-1")
    run_dir = next((tmp_path / "runs" / "tiny").iterdir())
    (checkpoint,) = (run_dir / "checkpoints").glob("step2-*.ckpt")
    val = {k: v for k, v in fitted.items() if k.startswith("val/")}
    assert val and val["val/rewards/margins"] != 0  # a trained policy against its initial reference

    own = ["--model.model", str(initial), "--trainer.logger", "false", "--ckpt_path", str(checkpoint)]
    assert run("validate", *own, "--model.reference", "precomputed") == val
    for table in cache.glob("*.pt"):
        table.unlink()
    assert run("validate", *own, "--model.reference", "precomputed") == val
    tested = run("test", *own, "--model.reference", "precomputed")
    live = run("test", *own, "--model.reference", "copy")
    assert tested.keys() == live.keys() and "test/loss" in tested
    for name, value in live.items():
        assert tested[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name

    export = ["--model.model", str(run_dir / "hf_export"), "--trainer.logger", "false",
              "--model.reference", "precomputed"]
    # the export holds the final (step-2) policy: the checkpoint's validation, against the initial reference
    exported = run("validate", *export, "--model.ref_model", str(initial))
    for name, value in val.items():
        assert exported[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    with pytest.warns(UserWarning, match="reference is a copy of the policy being evaluated"):
        assert run("validate", *export)["val/rewards/margins"] == 0


def test_precomputed_reference_validates_a_loader_whose_batches_carry_ref_logps():
    """Outside PreferenceDataModule the batches bring their own reference log-probs, in validate too: the
    evaluated split's pass (for the data module) leaves such a loader alone."""
    batch = random_batch()
    batch["ref_logps"] = torch.zeros(batch["input_ids"].shape[0])
    module = DPOModule(model_config=tiny_config("llama"), reference="precomputed")
    (metrics,) = trainer().validate(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert math.isfinite(metrics["val/loss"])


def test_a_reference_and_its_expansion_are_one_setting():
    """``copy`` is recorded as ``copy``; a config's class_path expansion with the default settings (by any import
    path of the class) compares equal to it, settings that differ do not, and a value that does not resolve is
    returned as given (the stage reports it)."""
    from dpo_lightning.references import reference_spec

    expansion = {"class_path": "dpo_lightning.reference.CopyReference", "init_args": {"sync_steps": None,
                                                                                     "sync_alpha": 1.0}}
    assert reference_spec(expansion) == reference_spec("copy") == "copy"
    synced = {**expansion, "init_args": {"sync_steps": 4, "sync_alpha": 0.5}}
    assert reference_spec(synced) == {"class_path": "dpo_lightning.references.copy.CopyReference",
                                      "init_args": {"sync_steps": 4, "sync_alpha": 0.5}}
    assert reference_spec("cpoy") == "cpoy"
