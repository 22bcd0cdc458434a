"""SFTModule: the loss by hand, prompt masking, the per-step token normalisation through Lightning's
gradient accumulation, and TRL SFTTrainer parity on the same batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from dpo_lightning import SFTModule
from dpo_lightning.training.metrics import SFTMetrics

from tiny import tiny_config


class FixedLogits(nn.Module):
    """Every position predicts p(1) = 3/4, p(0) = 1/4 over a 2-token vocabulary."""

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.tensor([0.0, math.log(3.0)]).expand(*input_ids.shape, 2)
        return SimpleNamespace(logits=logits)


def test_loss_and_token_accuracy_by_hand():
    """Row 0: labels [-100, 1, 0, -100]: NLL -log(3/4) - log(1/4) = 0.287682 + 1.386294 = 1.673976 (2 tokens);
    row 1: labels [-100, -100, 1, 1]: 2 * 0.287682 = 0.575364 (2 tokens). Loss = 2.249340 / 4 = 0.562335;
    argmax is 1 everywhere, so 3 of the 4 labels are hits: token accuracy 0.75; perplexity exp(0.562335);
    every position's entropy is 1/4 ln 4 + 3/4 ln 4/3 = 0.346574 + 0.215762 = 0.562335 nats."""
    module = SFTModule(model_config=tiny_config())
    module.model = FixedLogits()
    batch = {
        "input_ids": torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 1, 0, -100], [-100, -100, 1, 1]]),
    }
    loss = module.step(batch, module.val_metrics)
    assert loss.item() == pytest.approx(2.249340 / 4, abs=1e-6)
    out = module.val_metrics.compute()
    assert out["val/loss"].item() == pytest.approx(0.562335, abs=1e-6)
    assert out["val/mean_token_accuracy"].item() == pytest.approx(0.75)
    assert out["val/entropy"].item() == pytest.approx(0.562335, abs=1e-6)
    assert out["val/perplexity"].item() == pytest.approx(math.exp(0.562335), rel=1e-5)


def test_prompt_and_padding_tokens_do_not_count():
    """Changing what sits at positions labelled -100 (the prompt's labels, padding) leaves the loss;
    changing one completion label moves it."""
    torch.manual_seed(0)
    module = SFTModule(model_config=tiny_config()).eval()
    ids = torch.randint(1, 64, (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    base = module.step(batch, module.val_metrics)
    moved = labels.clone()
    moved[0, 2] = 7  # a prompt position now labelled: counted
    assert module.step({**batch, "labels": moved}, module.val_metrics) != base
    logits = module.model(input_ids=ids).logits
    shifted = labels[:, 1:].reshape(-1)
    reference = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), shifted, ignore_index=-100)
    torch.testing.assert_close(base, reference)


def test_metrics_weight_tokens_not_sequences():
    """Two sequences, mean NLL 1.0 over 1 token and 4.0 over 3 tokens: loss (1 + 12) / 4 = 3.25, not 2.5."""
    metrics = SFTMetrics("train")
    metrics.update(nll=torch.tensor([1.0, 12.0]), n_tokens=torch.tensor([1.0, 3.0]), n_correct=torch.tensor([1.0, 0.0]))
    out = metrics.compute()
    assert out["train/loss"].item() == pytest.approx(3.25)
    assert out["train/mean_token_accuracy"].item() == pytest.approx(0.25)


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _micro_batches(window: bool) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches with very different loss-token counts (2 and 11)."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 64, (1, 6), generator=g), torch.randint(1, 64, (2, 7), generator=g)]
    labels = [ids[0].clone(), ids[1].clone()]
    labels[0][:, :4] = -100  # 2 loss tokens
    labels[1][0, :2] = -100  # 5 + 6 = 11 loss tokens
    out = []
    for i, lab in zip(ids, labels):
        batch = {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab}
        if window:
            batch["window_tokens"] = torch.tensor(13)
        out.append(batch)
    return out


def _one_step_with_accumulation(batches) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = SFTModule(model_config=tiny_config(), optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                       scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(Batches(batches), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return {n: before[n] - p.detach() for n, p in module.model.named_parameters()}  # = lr * grad


def test_accumulated_step_equals_one_step_over_every_token():
    """With window_tokens, 2 micro-batches of 2 and 11 loss tokens make the update of
    sum(NLL over all 13 tokens) / 13 (TRL's num_items_in_batch); without it, Lightning's mean of the
    two micro-batch means weighs the 2 tokens of the first like the 11 of the second."""
    torch.manual_seed(0)
    reference = SFTModule(model_config=tiny_config())
    total = torch.zeros(())
    for batch in _micro_batches(window=False):
        logits = reference.model(input_ids=batch["input_ids"]).logits
        total = total + nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
    (total / 13).backward()
    expected = {n: p.grad for n, p in reference.model.named_parameters()}
    step = _one_step_with_accumulation(_micro_batches(window=True))
    for name, delta in step.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    unnormalised = _one_step_with_accumulation(_micro_batches(window=False))
    assert not all(torch.allclose(unnormalised[n], expected[n], rtol=1e-3, atol=1e-6) for n in expected)


@pytest.mark.trl
def test_loss_equals_trl_sft_trainer_on_the_same_batch(tmp_path):
    """TRL 1.16 SFTTrainer's completion-only loss (sum of NLL over completion tokens / their number)
    equals ours on the batch TRL's own collator builds from prompt/completion rows, and so do its logged
    ``entropy`` and ``mean_token_accuracy``."""
    trl = pytest.importorskip("trl")
    import datasets

    from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs

    tokenizer = build_tokenizer()
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in generate_pairs(6, 0)]
    torch.manual_seed(0)
    module = SFTModule(model_config={**tiny_config(), "vocab_size": len(tokenizer)}, tokenizer=tokenizer).eval()
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, completion_only_loss=True,
                         max_length=None, per_device_train_batch_size=6)
    trainer = trl.SFTTrainer(model=module.model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert (batch["labels"] != -100).sum() > 0 and (batch["labels"] == -100).sum() > 0
    with torch.no_grad():
        theirs = trainer.compute_loss(module.model, dict(batch))
        ours = module.step({k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, module.val_metrics)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    logged = {k.removeprefix("val/"): v.item() for k, v in module.val_metrics.compute().items()}
    for name in ("entropy", "mean_token_accuracy"):
        assert logged[name] == pytest.approx(trainer._metrics["eval"][name][-1], rel=1e-5, abs=1e-7), name
    assert logged["entropy"] > 0


SFT_SCRIPT = __import__("pathlib").Path(__file__).parent / "scripts" / "sft_dist_check.py"


def _sft_run(tmp_path, name: str, *args: str) -> dict[str, torch.Tensor]:
    import os
    import subprocess
    import sys

    out = tmp_path / f"{name}.pt"
    root = str(__import__("pathlib").Path(__file__).parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, str(SFT_SCRIPT), "--out", str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_and_accumulation_make_the_one_process_update(tmp_path):
    """One optimizer step over the same 8 examples: 1 process x 2 micro-batches of 4 == 2 processes (DDP,
    gloo) x 2 micro-batches of 2, because every micro-batch's summed NLL is divided by the step's loss
    tokens on all ranks. Without window_tokens (per-micro-batch means) the two runs differ."""
    single = _sft_run(tmp_path, "single", "--devices", "1", "--batch-size", "4")
    ddp = _sft_run(tmp_path, "ddp", "--devices", "2", "--batch-size", "2")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    ddp_means = _sft_run(tmp_path, "ddp_means", "--devices", "2", "--batch-size", "2", "--no-window")
    assert max((ddp_means[n] - single[n]).abs().max().item() for n in single) > 1e-4


def _assert_resumes_bitwise(tmp_path, data_kwargs: dict, crash_after: int, max_steps: int) -> None:
    """Fit ``max_steps`` (accumulation 2, dropout on, logs every 2 steps) uninterrupted, and crashed after
    step ``crash_after`` then resumed from last.ckpt: the same weights and logged metrics, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dpo_lightning import SFTDataModule
    from dpo_lightning.data.synthetic import generate_pairs

    from tiny import Crash, CrashAfterStep, ListLogger

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in generate_pairs(43, seed=4)]

    def data():
        return SFTDataModule(tokenizer="synthetic:sort", dataset=rows, val_split=None, max_length=32, batch_size=3,
                             **data_kwargs)  # fmt: skip

    def build():
        L.seed_everything(0, verbose=False)
        config = {**tiny_config("gpt2"), "resid_pdrop": 0.1, "attn_pdrop": 0.1}
        config.pop("vocab_size")
        return SFTModule(model_config=config, tokenizer="synthetic:sort", disable_dropout=False,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    def trainer(logger, callbacks, **kw):
        return L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=logger,
                         log_every_n_steps=2, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, **kw)

    full, full_log = build(), ListLogger()
    trainer(full_log, [], enable_checkpointing=False).fit(full, datamodule=data())

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(Crash):
        trainer(ListLogger(), [CrashAfterStep(crash_after), saver]).fit(build(), datamodule=data())
    resumed, resumed_log = build(), ListLogger()
    last = tmp_path / "last.ckpt"
    trainer(resumed_log, [], enable_checkpointing=False).fit(resumed, datamodule=data(), ckpt_path=last)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    tail = {step: row for step, row in full_log.rows.items() if step > crash_after}
    assert tail and tail == {step: row for step, row in resumed_log.rows.items() if step > crash_after}


def test_sft_resumes_mid_epoch_bitwise(tmp_path):
    """SFT with SFTDataModule, accumulation 2 (window_tokens) and dropout on: 43 rows in batches of 3 are
    15 batches, 8 optimizer steps per epoch (the last window holds one batch). Crashed after step 3
    (mid-epoch) and resumed from last.ckpt, the run (10 steps, into epoch 1) ends with the weights and
    logged metrics of the uninterrupted run, bit for bit."""
    _assert_resumes_bitwise(tmp_path, {}, crash_after=3, max_steps=10)


def test_packed_sft_resumes_mid_epoch_bitwise(tmp_path):
    """As above with ``packing: true``: the 43 rows packed into 21 rows of at most 32 tokens, batches of 3
    packed rows: 7 batches, 4 optimizer steps per epoch. Crashed after step 3 (one batch before the end of
    the epoch: the data module restores its position in packed rows) and resumed, 6 steps (into epoch 1)
    end bit for bit the same."""
    _assert_resumes_bitwise(tmp_path, {"packing": True}, crash_after=3, max_steps=6)


# -- TRL's packing=True (data.packing): rows bin-packed before batching ------------------------------


def _sort_rows(n: int) -> list[dict[str, str]]:
    from dpo_lightning.data.synthetic import generate_pairs

    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in generate_pairs(n, 0)]


def _trl_trainer(tmp_path, rows, tokenizer, model, **config):
    trl = pytest.importorskip("trl")
    import datasets

    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, completion_only_loss=True,
                         max_length=32, save_strategy="no", **config)  # fmt: skip
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer)  # fmt: skip


def _fit_one_epoch(rows, tokenizer, logger=None, **data):
    from dpo_lightning import SFTDataModule

    torch.manual_seed(0)
    module = SFTModule(model_config={**tiny_config(), "vocab_size": len(tokenizer)}, tokenizer=tokenizer)
    dm = SFTDataModule(tokenizer=tokenizer, dataset=rows, val_split=None, max_length=32, batch_size=4, **data)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=logger or False,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def test_packing_takes_trls_optimizer_steps_per_epoch(tmp_path):
    """60 prompt/completion rows, max_length 32, batch 4, accumulation 2, one epoch. TRL 1.16 with
    ``packing=True`` packs them into 30 rows: 8 batches, 4 optimizer steps. ``data.packing: true`` takes
    the same 4 steps (and the same 8 batches under either collator); without it a batch counts 4
    conversations: 15 batches, 8 steps (``collator: pack`` is TRL's ``padding_free``, not its ``packing``)."""
    from dpo_lightning.data.synthetic import build_tokenizer

    tokenizer, rows = build_tokenizer(), _sort_rows(60)
    torch.manual_seed(0)
    model = SFTModule(model_config={**tiny_config(), "vocab_size": len(tokenizer)}, tokenizer=tokenizer).model
    theirs = _trl_trainer(tmp_path, rows, tokenizer, model, packing=True, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, num_train_epochs=1)  # fmt: skip
    theirs.train()
    assert (len(theirs.train_dataset), len(theirs.get_train_dataloader()), theirs.state.global_step) == (30, 8, 4)
    trainer, _, dm = _fit_one_epoch(rows, tokenizer, packing=True, collator="pack")
    assert (len(dm.splits["train"]), trainer.num_training_batches, trainer.global_step) == (30, 8, 4)
    dm.hparams.collator = "pad"
    assert len(dm.train_dataloader()) == 8
    trainer, _, _ = _fit_one_epoch(rows, tokenizer, collator="pack")
    assert (trainer.num_training_batches, trainer.global_step) == (15, 8)


def test_packed_rows_give_the_padded_loss_and_trls(tmp_path):
    """The first 4 packed rows (8 conversations): TRL 1.16's loss on the batch its own collator makes of
    them (one flat row, position ids restarting per conversation) equals ours on the same rows laid out
    as 4 block-causal rows, and on the 8 conversations padded, each in its own row (1e-5)."""
    from dpo_lightning import SFTDataModule
    from dpo_lightning.data.synthetic import build_tokenizer

    tokenizer, rows = build_tokenizer(), _sort_rows(120)
    torch.manual_seed(0)
    module = SFTModule(model_config={**tiny_config(), "vocab_size": len(tokenizer)}, tokenizer=tokenizer).eval()
    theirs = _trl_trainer(tmp_path, rows, tokenizer, module.model, packing=True, per_device_train_batch_size=4)
    dm = SFTDataModule(tokenizer=tokenizer, dataset=rows, val_split=None, max_length=32, packing=True)
    features = [dm.splits["train"][i] for i in range(4)]
    assert [f["input_ids"] for f in features] == [theirs.train_dataset[i]["input_ids"] for i in range(4)]
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    losses = {}
    with torch.no_grad():
        losses["trl"] = theirs.compute_loss(module.model, dict(trl_batch)).item()
        for collator in ("pack", "pad"):
            dm.hparams.collator = collator
            batch = dm.collate_fn(features)
            losses[collator] = module.step(batch, module.val_metrics).item()
    assert dm.collate_fn(features)["input_ids"].shape[0] == sum(len(f["seq_lengths"]) for f in features) == 8
    assert losses["pack"] == pytest.approx(losses["trl"], rel=1e-5)
    assert losses["pad"] == pytest.approx(losses["trl"], rel=1e-5)


def test_packed_training_equals_padded_and_counts_every_token():
    """One epoch with ``packing: true`` (40 conversations in 21 packed rows), packed rows against the same
    conversations padded: the same logged loss at every step and the same weights (1e-5);
    ``train/num_tokens`` at the last step is every token of the packed split (no padding, nothing
    dropped) under both."""
    from dpo_lightning.data.synthetic import build_tokenizer

    from tiny import ListLogger

    tokenizer, rows = build_tokenizer(), _sort_rows(40)
    runs = {}
    for collator in ("pack", "pad"):
        logger = ListLogger()
        _, module, dm = _fit_one_epoch(rows, tokenizer, logger, packing=True, collator=collator)
        runs[collator] = (logger.rows, module.model.state_dict())
    tokens = sum(sum(row["seq_lengths"]) for row in dm.splits["train"])
    assert tokens == sum(len(ids) for ids in dm.splits["train"]["input_ids"])
    (pack_log, pack_weights), (pad_log, pad_weights) = runs["pack"], runs["pad"]
    assert len(dm.splits["train"]) == 21  # 40 conversations: 6 batches of up to 4 packed rows, 3 steps
    assert sorted(pack_log) == sorted(pad_log) and len(pack_log) == 3
    last = max(pack_log)
    assert pack_log[last]["train/num_tokens"] == pad_log[last]["train/num_tokens"] == tokens
    for step in pack_log:
        assert pack_log[step]["train/loss"] == pytest.approx(pad_log[step]["train/loss"], rel=1e-5)
    for name, weight in pack_weights.items():
        torch.testing.assert_close(weight, pad_weights[name], rtol=1e-5, atol=1e-6, msg=name)
