"""A resume lists the settings that differ from the checkpoint's, and only those: one class named by two import
paths, or a data setting the CLI derives from the stage, is no difference."""

from __future__ import annotations

import warnings

import torch
from test_cli import ParseOnlyCLI

from dpo_lightning.cli import cli_main
from dpo_lightning.training.runs import changed_hparams


def test_one_class_under_two_import_paths_is_not_a_change():
    # the flat layout's path (#28), as configs saved before it carry it
    saved = {"reference": {"class_path": "dpo_lightning.reference.CopyReference", "init_args": {"sync_steps": 2}}}
    same = {"reference": {"class_path": "dpo_lightning.CopyReference", "init_args": {"sync_steps": 2}}}
    assert changed_hparams(saved, same, "model") == []
    other = {"reference": {"class_path": "dpo_lightning.CopyReference", "init_args": {"sync_steps": 3}}}
    assert len(changed_hparams(saved, other, "model")) == 1
    another_class = {"reference": {"class_path": "dpo_lightning.reference.AdapterReference", "init_args": {}}}
    assert len(changed_hparams(saved, another_class, "model")) == 1
    # A path that does not import is compared as written.
    assert len(changed_hparams({"x": {"class_path": "no.such.Thing"}}, {"x": {"class_path": "no.such.Other"}},
                               "model")) == 1


def test_a_kto_resume_does_not_list_the_unpaired_flag_the_cli_sets(tmp_path, monkeypatch):
    """A KTO checkpoint saved before `KTODataModule` recorded ``unpaired: true``; the CLI now maps the config to
    KTODataModule (no ``unpaired``) before the resume check, which compares what will run."""
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 2, "epoch": 0, "hyper_parameters": {},
                "datamodule_hyper_parameters": {"unpaired": True, "batch_size": 4}}, ckpt)
    monkeypatch.setattr("dpo_lightning.cli.fit.check_checkpoint", lambda path: None)
    args = ["fit", "--config", "recipes/tiny.yaml", "--model.class_path", "dpo_lightning.KTOModule",
            "--data.batch_size", "4", "--ckpt_path", str(ckpt)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(args, cli_class=ParseOnlyCLI)
    said = "\n".join(str(w.message) for w in caught)
    assert "data.unpaired" not in said
    # and a real difference is still listed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main([*args[:-4], "--data.batch_size", "8", "--ckpt_path", str(ckpt)], cli_class=ParseOnlyCLI)
    assert "data.batch_size: 4 (checkpoint) -> 8 (now)" in "\n".join(str(w.message) for w in caught)


def test_a_reference_free_resume_does_not_list_the_reference_the_stage_chose(tmp_path, monkeypatch):
    """A SimPO run records ``reference: none`` (the default ``copy`` becomes ``none`` for reference-free losses);
    resuming it with the same command is no change, and a loss that needs a reference still is one."""
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 2, "epoch": 0, "hyper_parameters": {"reference": "none", "loss_type": "simpo"}}, ckpt)
    monkeypatch.setattr("dpo_lightning.cli.fit.check_checkpoint", lambda path: None)
    args = ["fit", "--config", "recipes/tiny.yaml", "--ckpt_path", str(ckpt)]

    def said(*extra: str) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli_main([*args, *extra], cli_class=ParseOnlyCLI)
        return "\n".join(str(w.message) for w in caught)

    assert "model.reference" not in said("--model.loss_type", "simpo")
    changed = said("--model.loss_type", "sigmoid")
    assert "model.reference: 'none' (checkpoint) -> 'copy' (now)" in changed and "model.loss_type" in changed
