"""The stage base is a seam: a new objective is a subclass in a test file, trained through the
real CLI with no change to shared code; config mistakes are refused before any weights load."""

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from dpo_lightning import CausalLMModule, DPOModule, KTOModule, LoraOptions
from dpo_lightning.cli import cli_main
from dpo_lightning.training.metrics import RunningMeans

ROOT = Path(__file__).resolve().parents[1]


class MarginMetrics(RunningMeans):
    def __init__(self, prefix: str) -> None:
        super().__init__(prefix, ("loss", "margin"))

    def update(self, *, losses: Tensor, margins: Tensor) -> None:
        self.means["loss"].update(losses.detach().float())
        self.means["margin"].update(margins.detach().float())

    def compute(self) -> dict[str, Tensor]:
        return {f"{self.prefix}/{name}": metric.compute() for name, metric in self.means.items()}


class MarginObjective(CausalLMModule):
    """A toy reference-free objective: push the chosen response's mean token log-prob above the
    rejected one's by a hinge of width ``margin``."""

    metrics_class = MarginMetrics
    checkpoint_monitor = ("val/margin", "max")

    def __init__(self, margin: float = 1.0, **kwargs) -> None:
        """
        Args:
            margin: Hinge width in nats per token.
        """
        super().__init__(**kwargs)

    def step(self, batch: Mapping[str, Tensor], metrics: MarginMetrics) -> Tensor:
        out = self.sequence_logps(self.model, batch)
        mean = out.logps / out.n_tokens.clamp(min=1)  # (2B,)
        b = mean.shape[0] // 2
        margins = mean[:b] - mean[b:]
        losses = torch.relu(self.hparams.margin - margins)
        metrics.update(losses=losses, margins=margins)
        return losses.mean()


def toy_recipe(tmp_path: Path) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    recipe["model"] = {
        "class_path": f"{__name__}.MarginObjective",
        "init_args": {
            "margin": 2.0,
            "model_config": recipe["model"]["model_config"],
            "optimizer": recipe["model"]["optimizer"],
            "lr_decay": "constant",
        },
    }
    recipe["trainer"].update(
        max_steps=40, val_check_interval=20, enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_new_objective_defined_here_trains_through_the_real_cli_and_exports(tmp_path):
    cli = cli_main(["fit", "--config", str(toy_recipe(tmp_path))])
    assert type(cli.model).__name__ == "MarginObjective" and cli.model.hparams.margin == 2.0
    metrics = cli.trainer.callback_metrics
    assert metrics["val/margin"] > 0.5, metrics  # the toy objective learned the synthetic preference
    run = Path(cli.trainer.log_dir)
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/margin" and Path(checkpoint.best_model_path).name.startswith("step")
    assert (run / "hf_export" / "model.safetensors").exists()
    # Any stage's checkpoint exports through the same command.
    from dpo_lightning.cli import main

    main(["export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "again")])
    assert (tmp_path / "again" / "model.safetensors").exists()


def no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded before the config was checked")


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DPOModule(model="gpt2", loss_type="sigmod"), "Unknown loss_type 'sigmod'.*Valid names"),
        (lambda: DPOModule(model="gpt2", loss_kwargs={"discopop_taw": 0.1}), "discopop_taw"),
        (lambda: DPOModule(model="gpt2", loss_type="sigmoid", loss_kwargs={"discopop_tau": 0.1}),
         "not used by loss_type.*discopop"),
        (lambda: DPOModule(model="gpt2", loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (lambda: DPOModule(model="gpt2", loss_type="kto"), "use KTOModule"),
        (lambda: DPOModule(model="gpt2", reference="coppy"), "unknown reference 'coppy'.*copy, adapter"),
        (lambda: DPOModule(model="gpt2", reference="none"), "reference='none' suits reference-free"),
        (lambda: KTOModule(model="gpt2", reference="precomputed"), "KTO needs a live reference"),
        (lambda: DPOModule(model="gpt2", lora=LoraOptions(r=0)), "lora.r must be >= 1"),
        # (these two were refused only once the policy had loaded)
        (lambda: DPOModule(model="gpt2", reference="adapter"), "adapter.*set the lora group"),
        (lambda: KTOModule(model="gpt2", reference="adapter"), "adapter.*set the lora group"),
        (lambda: DPOModule(model="gpt2", reference="adapter", lora=LoraOptions(), ref_model="gpt2"),
         "adapter.*leave model.ref_model unset"),
    ],
    ids=["loss-name", "hparam-typo", "unused-hparam", "unused-smoothing", "kto-in-dpo", "reference-name",
         "none-needs-free-loss", "kto-precomputed", "lora-rank", "adapter-without-lora", "kto-adapter-without-lora",
         "adapter-with-ref-model"],
)
def test_config_mistakes_are_refused_before_weights_load(monkeypatch, build, match):
    monkeypatch.setattr("dpo_lightning.models.loading.load_model", no_weights)
    with pytest.raises(ValueError, match=match):
        build()


def test_adapter_reference_without_lora_is_refused():
    with pytest.raises(ValueError, match="set the lora group"):
        DPOModule(model_config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32},
                  reference="adapter")


def test_lora_combines_with_a_precomputed_reference_and_with_reference_free_losses():
    """LoRA is independent of the reference: LoRA + precomputed (lowest memory), LoRA + SimPO (no
    no-grad forward of the base at all)."""
    from dpo_lightning import PrecomputedReference

    from tiny import tiny_config

    lora = LoraOptions(r=4, target_modules=["q_proj", "v_proj"])
    pre = DPOModule(model_config=tiny_config(), lora=lora, reference=PrecomputedReference())
    assert pre.ref_model is not None and not any("lora_" in n for n, _ in pre.ref_model.named_parameters())
    assert all("lora_" in n for n, p in pre.model.named_parameters() if p.requires_grad)
    simpo = DPOModule(model_config=tiny_config(), lora=lora, loss_type="simpo")
    assert simpo.ref_model is None and simpo.hparams.reference == "none"
