"""Exact resume: interrupted after step k and resumed from its last checkpoint, a run ends with
weights bitwise identical to the uninterrupted run, and logs the same metrics."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, DistributedSampler

from dpo_lightning import CopyReference, DPOModule, LoraOptions
from dpo_lightning.data.sampler import ResumableSampler, ResumableTrainData
from dpo_lightning.training.callbacks import LatestModelCheckpoint, Preempted

from tiny import Crash, CrashAfterStep, ListLogger, SignalAtBatch, random_batch, tiny_config

PAIRS, BATCH, STEPS, CRASH_AT = 10, 2, 7, 3  # 5 batches per epoch: the crash is mid-epoch 0, the run ends in epoch 1


def pair(i: int) -> dict[str, torch.Tensor]:
    return random_batch(b=1, t=10, seed=i)  # (2, T): chosen row, rejected row


def collate(pairs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """B pairs -> the (2B, T) contract: all chosen rows, then all rejected rows."""
    return {k: torch.cat([p[k][:1] for p in pairs] + [p[k][1:] for p in pairs]) for k in pairs[0]}


class PairData(ResumableTrainData, L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.pairs = [pair(i) for i in range(PAIRS)]

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler(self.pairs, BATCH, seed=7)
        return DataLoader(self.pairs, batch_size=BATCH, sampler=sampler, collate_fn=collate)


class PlainData(L.LightningDataModule):
    """A seeded shuffling DataLoader without a resumable position: Lightning restarts its epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = [pair(i) for i in range(PAIRS)]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(7)
        return DataLoader(self.pairs, batch_size=BATCH, shuffle=True, generator=g, collate_fn=collate)


def make_module() -> DPOModule:
    L.seed_everything(0, verbose=False)
    # Dropout on, so the result also depends on the RNG stream being restored.
    config = {**tiny_config("gpt2"), "resid_pdrop": 0.1, "attn_pdrop": 0.1}
    return DPOModule(model_config=config, disable_dropout=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def make_trainer(logger: Logger, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(**{
        "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "logger": logger, "log_every_n_steps": 2,
        "callbacks": callbacks, "enable_progress_bar": False, "enable_model_summary": False, **kw,
    })


def uninterrupted(data_cls, build=make_module) -> tuple[dict[str, torch.Tensor], ListLogger]:
    module, logger = build(), ListLogger()
    make_trainer(logger, [], enable_checkpointing=False).fit(module, datamodule=data_cls())
    return module.state_dict(), logger


def interrupted_then_resumed(
    data_cls, tmp_path, build=make_module, *, saver=None, stop=None, crash_at: int = CRASH_AT
) -> tuple[dict[str, torch.Tensor], ListLogger]:
    """Stopped after step ``crash_at`` (``stop``: a callback raising ``Crash`` by default), with ``last.ckpt``
    written then by ``saver`` (every step by default), and resumed from it."""
    saver = saver or ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises((Crash, Preempted)):
        make_trainer(ListLogger(), [stop or CrashAfterStep(crash_at), saver]).fit(build(), datamodule=data_cls())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == crash_at
    module, logger = build(), ListLogger()
    trainer = make_trainer(logger, [], enable_checkpointing=False)
    trainer.fit(module, datamodule=data_cls(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == STEPS
    return module.state_dict(), logger


def test_resumed_run_is_bitwise_identical_to_uninterrupted(tmp_path):
    """Weights, and the metric window that straddles the crash (logged at step 4 over steps 3-4)."""
    expected, logs = uninterrupted(PairData)
    resumed, resumed_logs = interrupted_then_resumed(PairData, tmp_path / "a")
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name
    after = [s for s in logs.rows if s > CRASH_AT]  # the rows logged after the crash (at step k, TRL's axis)
    assert after and sorted(resumed_logs.rows) == after
    for step in after:
        assert resumed_logs.rows[step] == logs.rows[step], step


def test_tr_dpo_resume_continues_from_the_synced_reference(tmp_path):
    """TR-DPO from a saved model (a reference that could be rebuilt from its path): the reference
    synced at step 2 is kept in the checkpoint, so the resumed run ends bitwise equal to the
    uninterrupted one. It used to be left out and rebuilt from the path: the resumed run restarted
    TR-DPO from the original reference and ended 1.9e-3 away."""
    make_module().model.save_pretrained(tmp_path / "base")

    def build() -> DPOModule:
        L.seed_everything(0, verbose=False)
        return DPOModule(model=str(tmp_path / "base"), disable_dropout=False,
                         reference=CopyReference(sync_steps=2, sync_alpha=0.5),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    expected, _ = uninterrupted(PairData, build)
    resumed, _ = interrupted_then_resumed(PairData, tmp_path / "run", build)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("reference.model.") for k in saved)
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name


def test_lora_tr_dpo_resume_continues_from_the_synced_reference(tmp_path):
    """TR-DPO with a LoRA policy (GPT-2's fused c_attn, a transposed Conv1D): the reference, a plain model of
    the base architecture, syncs to the merged policy (it used to fail at the first sync: "the reference has
    no parameter 'base_model.model...'"); the checkpoint keeps it and leaves the frozen base out, and the
    resumed run ends bitwise equal, adapters and reference alike."""
    make_module().model.save_pretrained(tmp_path / "base")

    def build() -> DPOModule:
        L.seed_everything(0, verbose=False)
        return DPOModule(model=str(tmp_path / "base"), disable_dropout=False,
                         lora=LoraOptions(r=4, alpha=8, target_modules=["c_attn"]),
                         reference=CopyReference(sync_steps=2, sync_alpha=0.5),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    expected, logs = uninterrupted(PairData, build)
    resumed, resumed_logs = interrupted_then_resumed(PairData, tmp_path / "run", build)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("reference.model.") for k in saved) and not any("base_layer" in k for k in saved)
    base = build()
    moved = [k for k, v in base.ref_model.state_dict().items() if not torch.equal(v, expected[f"reference.model.{k}"])]
    assert any("c_attn" in k for k in moved)  # the syncs did move the reference
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name
    assert_same_logs_after(logs, resumed_logs, CRASH_AT)


def assert_same_logs_after(logs: ListLogger, resumed: ListLogger, step: int) -> None:
    """The resumed run logs exactly what the uninterrupted one logged at optimizer steps ``step`` and later."""
    after = {s: row for s, row in logs.rows.items() if s >= step}
    assert after and resumed.rows == after


@pytest.mark.parametrize("saver", ["every_n_train_steps", "save_every_n_steps", "preemption"])
def test_checkpoint_at_a_logging_step_resumes_its_logs(tmp_path, saver):
    """Checkpoints every 2 steps, logs every 2 steps, stopped after step 4. Callbacks see a batch's end
    before the stage logs its window, so the checkpoint of step 4 held the window of steps 3-4 not yet
    logged: the resumed run logged it again, averaged into its first log (train/loss at step 6 was the
    mean over steps 3-6). A preempted run raised before logging step 4 at all."""
    folder = tmp_path / saver
    savers = {
        "every_n_train_steps": ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=0),
        "save_every_n_steps": LatestModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                                    save_every_n_steps=2, save_every_minutes=None),
        "preemption": LatestModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, save_every_minutes=None),
    }
    stop = SignalAtBatch(batch=3) if saver == "preemption" else None  # SIGTERM in step 4: saved at its end
    expected, logs = uninterrupted(PairData)
    resumed, resumed_logs = interrupted_then_resumed(PairData, folder, saver=savers[saver], stop=stop, crash_at=4)
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name
    assert_same_logs_after(logs, resumed_logs, 5)  # the logs after step 4 (logged at steps done)


class OddEpochs(PairData):
    """5 batches per epoch (odd) with accumulation 2: each epoch ends with a 1-batch optimizer step."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.pairs[:4], batch_size=BATCH, collate_fn=collate)


class ValidationSchedule(L.Callback):
    """(optimizer step, whether between the micro-batches of a step) at each validation of a fit."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self.seen.append((trainer.global_step, trainer.fit_loop.epoch_loop._should_accumulate()))


def odd_epochs_trainer(callbacks: list, **kw) -> L.Trainer:
    return make_trainer(ListLogger(), callbacks, max_steps=-1, max_epochs=2, accumulate_grad_batches=2,
                        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0, **kw)


def test_epoch_2_checkpoints_with_accumulation_resume_exactly(tmp_path):
    """5 batches per epoch, accumulation 2 (3 optimizer steps per epoch: batches 2, 4 and the lone 5th),
    validation and a checkpoint every 2 batches (every step). Lightning counts validation batches across
    epochs but restarts the accumulation every epoch, so its batches 6 and 8 are the 1st and 3rd of
    epoch 2: it validated and checkpointed between two micro-batches, and a resume from there lost the
    first one's gradients (weights 1e-3 off). Validation now follows optimizer steps, TRL's eval_steps."""
    schedule = ValidationSchedule()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}-{step}")
    module = make_module()
    odd_epochs_trainer([schedule, saver]).fit(module, datamodule=OddEpochs())
    assert schedule.seen == [(step, False) for step in range(1, 7)]
    expected = module.state_dict()
    second_epoch = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    assert [p.name for p in second_epoch] == ["epoch=1-step=4.ckpt", "epoch=1-step=5.ckpt", "epoch=1-step=6.ckpt"]
    for ckpt in second_epoch[:2]:
        resumed = make_module()
        odd_epochs_trainer([], enable_checkpointing=False).fit(resumed, datamodule=OddEpochs(), ckpt_path=ckpt)
        for name, value in expected.items():
            assert torch.equal(value, resumed.state_dict()[name]), (ckpt.name, name)


def test_a_time_based_checkpoint_due_mid_accumulation_waits_for_the_optimizer_step(tmp_path, monkeypatch):
    """A plain ``ModelCheckpoint(train_time_interval=3s)`` on a clock that reads one second per batch, under
    accumulation 2 over epochs of 5 batches (steps end at batches 2, 4, 5, 7, 9, 10): Lightning's saver fell due
    at batches 3, 6 and 9, each the first micro-batch of a step, and saved there (the partial gradients lost).
    Its saves now wait for the step's last micro-batch: batches 4, 7 and 10, steps 2, 4 and 6 (the CLI test in
    test_resume_cli.py resumes from each)."""
    import datetime

    import lightning.pytorch.callbacks.model_checkpoint as lightning_checkpoint

    from dpo_lightning.stages.base import CausalLMModule

    class Clock:
        now = 0.0

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

    monkeypatch.setattr(lightning_checkpoint, "time", Clock)
    start = CausalLMModule.on_train_batch_start

    def tick(self, batch, batch_idx):
        Clock.now += 1
        return start(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "on_train_batch_start", tick)
    saves = []

    class Record(L.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            saves.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.processed))

    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, train_time_interval=datetime.timedelta(seconds=3))
    make_trainer(ListLogger(), [Record(), saver], max_steps=6, accumulate_grad_batches=2).fit(
        make_module(), datamodule=PairData())
    assert saves == [(2, 4), (4, 2), (6, 5)]  # (optimizer steps, batches of the epoch done)


def test_validation_by_fraction_of_an_epoch_waits_for_the_optimizer_step():
    """7 batches per epoch, accumulation 2 (steps end at batches 2, 4, 6, 7), validation twice an epoch:
    Lightning's batch 3 falls inside the step ending at batch 4, so validation runs after that step."""

    class Seven(OddEpochs):
        def __init__(self) -> None:
            super().__init__()
            self.pairs = [pair(i) for i in range(14)]

    schedule = ValidationSchedule()
    trainer = make_trainer(ListLogger(), [schedule], enable_checkpointing=False, max_steps=-1, max_epochs=2,
                           accumulate_grad_batches=2, val_check_interval=0.5, num_sanity_val_steps=0)
    trainer.fit(make_module(), datamodule=Seven())
    assert schedule.seen == [(2, False), (3, False), (6, False), (7, False)]


@pytest.mark.parametrize("interval, accumulate, ok", [(6, 3, True), (5, 2, False), (4, 1, True)])
def test_validation_mid_accumulation_is_refused_before_training(interval, accumulate, ok):
    """TRL's eval_steps maps to val_check_interval, which counts batches: 5 with accumulation 2
    validated and checkpointed between two micro-batches, and resuming from there was inexact."""
    trainer = make_trainer(ListLogger(), [], enable_checkpointing=False, check_val_every_n_epoch=None,
                           val_check_interval=interval, accumulate_grad_batches=accumulate, limit_val_batches=1)
    data = PairData()
    data.val_dataloader = data.train_dataloader
    if ok:
        trainer.fit(make_module(), datamodule=data)
    else:
        with pytest.raises(ValueError, match="val_check_interval=5 is not a multiple of.*use 4 or 6"):
            trainer.fit(make_module(), datamodule=data)
        assert trainer.global_step == 0


def test_without_a_resumable_position_the_run_differs(tmp_path):
    """The check above can fail: a plain shuffling loader replays the epoch from its start."""
    expected, _ = uninterrupted(PlainData)
    resumed, _ = interrupted_then_resumed(PlainData, tmp_path)
    assert any(not torch.equal(v, resumed[k]) for k, v in expected.items())


# ---------------------------------------------------------------------------- the sampler itself


@pytest.mark.parametrize("n", [10, 11])
def test_sampler_shards_like_distributed_sampler_and_resumes_mid_epoch(n):
    data = list(range(n))
    for rank in range(2):
        ours = ResumableSampler(data, 2, num_replicas=2, rank=rank, seed=3)
        theirs = DistributedSampler(data, num_replicas=2, rank=rank, seed=3)
        for epoch in range(2):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)
        ours.resume(epoch=1, batches=2)
        ours.set_epoch(1)
        assert list(ours) == list(theirs)[4:] and len(ours) == len(theirs)  # len stays the full epoch's
        ours.set_epoch(2)
        theirs.set_epoch(2)
        assert list(ours) == list(theirs)  # the skip applies to the resumed epoch only
    halves = [set(ResumableSampler(data, 2, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert halves[0] | halves[1] == set(data)
