"""KTO's data module through the CLI (#28): a KTO stage gets `KTODataModule`, and configs written when
`PreferenceDataModule(unpaired=...)` made KTO's examples still run, with a warning naming the new setting."""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml
from test_cli import ParseOnlyCLI

from dpo_lightning import KTODataModule, PreferenceDataModule
from dpo_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
KTO = ["--model.class_path", "dpo_lightning.KTOModule"]


def _parse(*args: str) -> tuple[dict, list[str]]:
    """The fit config's data section as the CLI will build it, and the warnings said on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", *args], cli_class=ParseOnlyCLI)
    data = cli.config["fit"]["data"]
    return {"class_path": data.class_path, **data.init_args.as_dict()}, [str(w.message) for w in caught]


def _built(data: dict):
    """The data module those settings build (no data is read)."""
    cls = {c.__name__: c for c in (KTODataModule, PreferenceDataModule)}[data["class_path"].rsplit(".", 1)[-1]]
    return cls(**{k: v for k, v in data.items() if k != "class_path"})


def test_a_kto_stage_without_a_data_class_gets_the_kto_data_module_silently():
    data, said = _parse("--config", TINY, *KTO)
    assert data["class_path"].endswith("KTODataModule")
    assert not [s for s in said if "unpaired" in s]
    module = _built(data)
    assert module.batch_format == "unpaired" and module.hparams.batch_size == 32  # the recipe's settings


def test_an_old_kto_config_saying_unpaired_true_maps_to_the_kto_data_module_with_a_warning(tmp_path):
    """What a KTO run's saved config.yaml held before KTODataModule: PreferenceDataModule, ``unpaired: true``
    (the CLI wrote it from the stage) and a collator of the pair module's that meant KTO's."""
    config = yaml.safe_load(Path(TINY).read_text())
    model = {k: v for k, v in config["model"].items() if k != "loss_type"}  # KTO has its own loss
    config["model"] = {"class_path": "dpo_lightning.KTOModule", "init_args": model}
    config["data"] = {"class_path": "dpo_lightning.data.PreferenceDataModule",
                      "init_args": {**config["data"], "unpaired": True, "collator": "pad"}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    data, said = _parse("--config", str(tmp_path / "old.yaml"))
    assert data["class_path"].endswith("KTODataModule")
    assert "unpaired" not in data and data["collator"] == "auto"
    (warning,) = [s for s in said if "data.unpaired" in s]
    assert "data.class_path: dpo_lightning.KTODataModule" in warning
    assert _built(data).choose_collator(None) == ("kto", "unpaired examples")


def test_unpaired_false_in_a_dpo_config_is_dropped_quietly_and_true_with_a_warning():
    """Every config saved before held ``unpaired: false`` (tests/fixtures/old_run/config.yaml too): what a pair
    stage does anyway, so it is dropped without a word; ``true`` on a pair stage asked for something the stage
    does not do, so it is dropped with a warning."""
    data, said = _parse("--config", TINY, "--data.unpaired", "false")
    assert data["class_path"].endswith("PreferenceDataModule") and "unpaired" not in data
    assert not [s for s in said if "unpaired" in s]
    assert _built(data).batch_format == "pairs"
    data, said = _parse("--config", TINY, "--data.unpaired", "true")
    assert data["class_path"].endswith("PreferenceDataModule") and "unpaired" not in data
    assert any("data.unpaired is deprecated and ignored (it was True)" in s for s in said)
    # Not given: nothing said.
    data, said = _parse("--config", TINY)
    assert not [s for s in said if "unpaired" in s]
