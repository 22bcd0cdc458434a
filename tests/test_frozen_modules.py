"""A frozen model is one more attribute of a stage: a distillation toy stage, defined here, whose teacher is a
``FrozenModel`` found by the base's one hook (``CausalLMModule.frozen_models``), with no stage code for it.

The student (a tiny random-init llama) learns to match the teacher's next-token distribution: the loss is
``KL(teacher || student)`` over the vocabulary, averaged over the unpadded positions. The teacher is loaded from a
path, so it is rebuildable: checkpoints hold none of its weights, and a resume loads it again. The 2-process FSDP2
run executes this file as a script (Lightning's launcher re-executes ``sys.argv``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))  # tiny, when this file runs as the FSDP2 script
from dpo_lightning.data.sampler import ResumableTrainData  # noqa: E402
from dpo_lightning.models.frozen import FrozenModel  # noqa: E402
from dpo_lightning.models.loading import load_model  # noqa: E402
from dpo_lightning.stages.base import CausalLMModule  # noqa: E402
from dpo_lightning.training.metrics import RunningMeans  # noqa: E402

from tiny import random_batch, tiny_config  # noqa: E402

ROOT = Path(__file__).parents[1]
STEPS, CUT = 6, 3  # optimizer steps of a run; the step whose checkpoint the resume starts from


class DistillMetrics(RunningMeans):
    def __init__(self, prefix: str) -> None:
        super().__init__(prefix, ("loss",))

    def update(self, *, loss: Tensor) -> None:
        self.means["loss"].update(loss)

    def compute(self) -> dict[str, Tensor]:
        return {f"{self.prefix}/loss": self.means["loss"].compute()}


class DistillModule(CausalLMModule):
    """Student trained on ``KL(teacher || student)`` per position; the teacher is a frozen model from ``teacher``."""

    metrics_class = DistillMetrics
    batch_format = "sft"

    def __init__(self, teacher: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.teacher = FrozenModel(load_model(teacher), source=teacher)

    def step(self, batch, metrics: DistillMetrics) -> Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student = self.model(**inputs, use_cache=False).logits.float()  # (N, T, V)
        with torch.no_grad():
            teacher = self.teacher.model(**inputs, use_cache=False).logits.float()  # (N, T, V)
        kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        loss = kl[batch["attention_mask"].bool()].mean()  # over the unpadded positions
        metrics.update(loss=loss.detach())
        return loss


def save_teacher(path: Path) -> str:
    torch.manual_seed(1)
    load_model(config=tiny_config("llama")).save_pretrained(path)
    return str(path)


def student(teacher: str) -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(teacher, model_config=tiny_config("llama"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                         memory={"fsdp_mixed_precision": False})


class Rows(ResumableTrainData, L.LightningDataModule):
    """16 rows, 4 per batch (per rank), shuffled by a sampler that a checkpoint resumes mid-epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = [{k: v[i] for k, v in random_batch(b=4, seed=s).items()} for s in range(2) for i in range(8)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=4, sampler=self.train_sampler(self.rows, 4, seed=7))


def trainer(root: Path, **kwargs) -> L.Trainer:
    kwargs.setdefault("callbacks", [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=CUT, save_top_k=-1,
                                                    filename="{step}")])
    kwargs.setdefault("max_steps", STEPS)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, **kwargs)


@torch.no_grad()
def kl_on(module: DistillModule, batch: dict) -> float:
    return float(module.step(batch, DistillMetrics("probe")))


def test_a_teacher_is_one_more_frozen_module(tmp_path):
    """Trains (the KL to the teacher falls), keeps the teacher frozen and out of checkpoints (it is rebuilt from its
    path), and a resume from the mid-run checkpoint ends on the uninterrupted run's weights, bitwise."""
    teacher = save_teacher(tmp_path / "teacher")
    straight = student(teacher)
    assert list(straight.frozen_models()) == ["teacher"]
    before = kl_on(straight, random_batch(b=2, seed=0))
    teacher_before = {k: v.clone() for k, v in straight.teacher.model.state_dict().items()}
    trainer(tmp_path).fit(straight, datamodule=Rows())
    assert kl_on(straight, random_batch(b=2, seed=0)) < 0.5 * before
    assert not straight.teacher.model.training and not any(p.requires_grad for p in straight.teacher.parameters())
    for name, value in straight.teacher.model.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name

    mid = torch.load(tmp_path / "ckpt" / f"step={CUT}.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.") for k in mid) and not any(k.startswith("teacher.") for k in mid)

    resumed = student(teacher)
    mid_run = tmp_path / "ckpt" / f"step={CUT}.ckpt"
    trainer(tmp_path / "resumed", callbacks=[]).fit(resumed, datamodule=Rows(), ckpt_path=mid_run)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_teacher_built_in_memory_is_kept_in_checkpoints(tmp_path):
    """A frozen model with no source cannot be loaded again: checkpoints hold it, and a load restores it."""
    module = student(save_teacher(tmp_path / "teacher"))
    module.teacher.source = None
    run = trainer(tmp_path, callbacks=[], max_steps=1)
    run.fit(module, datamodule=Rows())
    run.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=True)["state_dict"]
    held = {k.removeprefix("teacher.model."): v for k, v in saved.items() if k.startswith("teacher.model.")}
    assert held.keys() == module.teacher.model.state_dict().keys()


# ---------------------------------------------------------------------------------------- FSDP2, 2 processes


def run_fsdp2(tmp: Path, out: str, *args: str) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--root", str(tmp), "--out", out, *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(tmp / out, weights_only=False)


@pytest.mark.slow
def test_a_teacher_shards_under_fsdp2_and_a_resume_matches(tmp_path):
    """2 CPU processes (gloo), ``ModelParallelStrategy``: the teacher is sharded like the student, the KL falls,
    the sharded mid-run checkpoint holds no teacher entries, and a resume from it ends on the straight run's
    weights, bitwise."""
    save_teacher(tmp_path / "teacher")
    straight = run_fsdp2(tmp_path, "straight.pt")
    assert straight["teacher_sharded"] and straight["student_sharded"]
    assert straight["kl_after"] < 0.5 * straight["kl_before"]
    assert straight["checkpoint_keys"] and not [k for k in straight["checkpoint_keys"] if ".teacher." in k]
    resumed = run_fsdp2(tmp_path, "resumed.pt", "--resume")
    for name, value in straight["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), name


def main() -> None:
    """One FSDP2 run over 2 processes (each rank its own rows); rank 0 writes what the test reads."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint import FileSystemReader

    from dpo_lightning.training.distributed import full_state_dict, is_sharded

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = student(str(args.root / "teacher"))
    probe = random_batch(b=2, seed=0)
    kl_before = kl_on(module, probe)
    ckpt = args.root / "ckpt" / f"step={CUT}.ckpt"
    callbacks = [] if args.resume else None
    run = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                    tensor_parallel_size=1), max_steps=STEPS, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=args.root, use_distributed_sampler=False,
                    **({"callbacks": callbacks} if callbacks is not None else {"callbacks": [ModelCheckpoint(
                        dirpath=args.root / "ckpt", every_n_train_steps=CUT, save_top_k=-1, filename="{step}")]}))
    run.fit(module, datamodule=Rows(), ckpt_path=ckpt if args.resume else None)
    weights = {k: v.clone() for k, v in full_state_dict(module.model).items()}  # collective
    teacher_sharded = is_sharded(module.teacher.model)
    kl_after = kl_on(module, probe)  # each rank the whole probe batch: a forward through both sharded models
    if run.is_global_zero:
        keys = sorted(FileSystemReader(ckpt).read_metadata().state_dict_metadata) if not args.resume else []
        torch.save({"weights": weights, "teacher_sharded": teacher_sharded, "student_sharded": is_sharded(module.model),
                    "kl_before": kl_before, "kl_after": kl_after, "checkpoint_keys": keys}, args.root / args.out)


if __name__ == "__main__":
    main()
