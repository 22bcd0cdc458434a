"""A run written by the code before the package-layout redesign (#28; tests/fixtures/make_old_run.py, main at
04aeab6) still works with this code: its config parses (``--print_config``), its checkpoint names a stage class
by its old path (``dpo_lightning.dpo.DPOModule``) and still exports to the same weights, and a resume continues
to exactly the weights the old code reached."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.make_old_run import policy, resume
from safetensors.torch import load_file

from dpo_lightning import DPOModule
from dpo_lightning.cli import cli_main, main

OLD = Path(__file__).resolve().parent / "fixtures" / "old_run"


def test_the_old_checkpoint_names_its_stage_by_the_old_path_and_still_resolves():
    from dpo_lightning.stages.base import stage_class_of

    checkpoint = torch.load(OLD / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["dpo_lightning_stage"] == "dpo_lightning.dpo.DPOModule"
    assert stage_class_of(checkpoint) is DPOModule


def test_the_old_config_parses_and_prints(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", str(OLD / "config.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["reference"]["class_path"].endswith("CopyReference")
    assert printed["trainer"]["plugins"][0]["class_path"].endswith("AtomicCheckpointIO")


def test_the_old_checkpoint_exports_to_the_old_export(tmp_path):
    main(["export", str(OLD / "last.ckpt"), str(tmp_path / "export")])
    new, old = load_file(tmp_path / "export" / "model.safetensors"), load_file(OLD / "hf_export" / "model.safetensors")
    assert new.keys() == old.keys()
    for name in old:
        assert torch.equal(new[name], old[name]), name


def test_the_old_checkpoint_resumes_to_the_old_codes_weights(tmp_path):
    """... and without a warning that the settings changed: the checkpoint records ``reference: copy``, the old
    config its expansion ``{class_path: dpo_lightning.reference.CopyReference, init_args: {defaults}}``.

    Bitwise on the machine that wrote the fixture; float32 kernels differ by CPU (MKL picks them by instruction
    set), so elsewhere the weights agree to a few units in the last place: within 1e-6, where the two steps
    resumed move them by up to 2e-3 (a resume with another data order, RNG or optimizer state misses by far
    more; the test checks that its tolerance is that small next to the steps' change)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        new = policy(resume(OLD, tmp_path / "runs"))
    assert not [w for w in seen if "differ from the checkpoint" in str(w.message)], [str(w.message) for w in seen]
    old = load_file(OLD / "resumed_step6.safetensors")
    step4 = torch.load(OLD / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert new.keys() == old.keys()
    moved = max((old[name] - step4[name]).abs().max().item() for name in old)
    assert moved > 1000 * TOLERANCE, moved
    for name in old:
        assert torch.allclose(new[name], old[name], rtol=0, atol=TOLERANCE), (name, (new[name] - old[name]).abs().max())


TOLERANCE = 1e-6  # float32 ulps of weights ~0.05 are ~4e-9
