"""Scale-out on 2 CPU processes (gloo) against one process, and gradient accumulation.

Each multi-process run is ``tests/scripts/dist_check.py`` in a subprocess (Lightning's ``ddp``
launcher re-executes ``sys.argv``, which must be a script, not pytest). All runs see the same
global batches of 4 pairs; with 2 processes each rank gets 2 pairs of different lengths, so the
token-weighted ``logits/*`` metrics would differ if ranks were averaged rather than summed.
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dpo_lightning import DPOModule
from dpo_lightning.training.distributed import consolidate_checkpoint, decoder_layer_classes, decoder_layers

from tiny import random_batch, tiny_config

SCRIPT = Path(__file__).parent / "scripts" / "dist_check.py"
ROOT = Path(__file__).parents[1]


def run_script(tmp: Path, name: str, *args: str) -> dict:
    out = tmp / f"{name}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "ckpt").mkdir()
    return {
        # The baseline: one process, full logits. The others take the default path: lean log-probs.
        "single": run_script(tmp, "single", "--strategy", "single", "--lean", "off"),
        "ddp": run_script(tmp, "ddp", "--strategy", "ddp"),
        # fp32 compute so the comparison is exact up to reduction order; activation checkpointing on,
        # so one run covers sharding + recompute; it also saves both checkpoint formats.
        "fsdp2": run_script(
            tmp, "fsdp2", "--strategy", "fsdp2", "--activation-checkpointing", "--save-dir", str(tmp / "ckpt")
        ),
        # Only rank 0 builds the weights; rank 1 starts on the meta device and receives them after sharding.
        "fsdp2_sharded_init": run_script(
            tmp, "fsdp2_sharded_init", "--strategy", "fsdp2", "--activation-checkpointing", "--sharded-init"
        ),
        "ckpt_dir": tmp / "ckpt",
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(runs, strategy):
    """Same global batch -> same synced metrics, same first-step gradients, same weights after 3 AdamW
    steps. Measured here: metrics <= 2e-6 (logps ~ -20), gradients <= 2e-8, weights <= 1.1e-5 (AdamW
    divides by sqrt(v), which amplifies rounding-order differences of tiny gradients)."""
    assert_same_run(runs["single"], runs[strategy])


def assert_same_run(one: dict, two: dict) -> None:
    """Per-step train metrics, validation metrics, first-step gradients and final weights agree."""
    assert len(one["train"]) == len(two["train"]) == 3
    for a, b in zip(one["train"], two["train"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=5e-6), key
    assert one["val"].keys() == two["val"].keys() and len(one["val"]) >= 9
    for key, value in one["val"].items():
        assert two["val"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert len(two["grads"]) == len(one["grads"]) > 0
    assert max_diff(one["grads"], two["grads"]) < 1e-6
    assert max_diff(one["params"], two["params"]) < 1e-4


def test_fsdp2_on_prefix_shared_rows_matches_one_process_on_padded_rows(tmp_path):
    """The default fast path end to end under FSDP2: prefix-shared rows, lean log-probs, activation
    checkpointing, 2 processes, against one process on right-padded rows with full logits; the same pairs
    (each pair's prompt on both sides), the same tolerances as the padded two-process runs."""
    one = run_script(tmp_path, "single_pad", "--strategy", "single", "--lean", "off", "--collator", "pad")
    two = run_script(tmp_path, "fsdp2_share", "--strategy", "fsdp2", "--activation-checkpointing",
                     "--collator", "share")
    assert two["lean_logprobs"] and not one["lean_logprobs"]
    assert_same_run(one, two)


def test_sharded_init_trains_exactly_as_every_rank_loading_the_model(runs):
    """memory.sharded_init: rank 1 never holds the weights before sharding; rank 0 broadcasts them. The run is
    the ordinary FSDP2 run bit for bit (metrics, first-step gradients, final weights, what an export saves)."""
    plain, lean_init = runs["fsdp2"], runs["fsdp2_sharded_init"]
    assert plain["train"] == lean_init["train"] and plain["val"] == lean_init["val"]
    assert max_diff(plain["grads"], lean_init["grads"]) == 0
    assert max_diff(plain["params"], lean_init["params"]) == 0
    assert max_diff(plain["export_state"], lean_init["export_state"]) == 0
    assert lean_init["dtypes"] == plain["dtypes"]


def test_two_process_validation_counts_every_pair_once(tmp_path):
    """5 held-out pairs, eval batches of 2. On 2 ranks, rank 0 gets pairs 0, 2, 4 and rank 1 pairs
    1, 3 and pair 0 again (DistributedSampler's padding, so both run 2 batches); weighted 0, the
    repeat leaves val/* equal to one process's (measured: <= 2e-6 on logps ~ -20, else <= 4e-8).
    Plain DistributedSampler padding counts pair 0 twice: measured errors of 0.26 on logps/rejected,
    0.027 on rewards/chosen and 1/30 on accuracies (0.2 -> 1/6)."""
    one = run_script(tmp_path, "single", "--strategy", "single", "--eval-odd")
    two = run_script(tmp_path, "ddp", "--strategy", "ddp", "--eval-odd")
    assert one["batches"] == [3] and two["batches"] == [2]
    assert len(one["val"]) == 11 and one["val_plain"] == one["val"]  # with entropy, token accuracy
    assert two["val"].keys() == one["val"].keys()
    for key, value in one["val"].items():
        assert two["val"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    plain_error = {k: abs(two["val_plain"][k] - v) for k, v in one["val"].items()}
    assert plain_error["val/logps/rejected"] > 0.1 and plain_error["val/rewards/accuracies"] > 0.03


@pytest.mark.slow  # two 2-process fits
def test_fsdp2_reduce_scatters_once_per_optimizer_step_under_accumulation(tmp_path):
    """Issue #30 item 7: Lightning's no_backward_sync covers DDP only, so FSDP2 reduce-scattered every
    micro-batch's gradients (at 7B ~63 GB per rank per micro-batch across nodes). With accumulation 2 over
    3 optimizer steps, each of the policy's FSDP units (2 decoder layers and the root) now reduce-scatters
    once per step: 3 x 3 = 9 on each rank, not 18; the trained weights, the first step's gradients and the
    logged metrics equal those of the run that reduce-scatters every micro-batch (to reduction order)."""
    once = run_script(tmp_path, "once", "--strategy", "fsdp2", "--accumulate", "2")
    every = run_script(tmp_path, "every", "--strategy", "fsdp2", "--accumulate", "2", "--sync-every-micro-batch")
    steps = 3
    assert once["fsdp_units"] == 3
    assert once["reduce_scatters"] == steps * once["fsdp_units"]
    assert every["reduce_scatters"] == 2 * steps * every["fsdp_units"]
    assert max_diff(once["grads"], every["grads"]) < 1e-6
    assert max_diff(once["params"], every["params"]) < 1e-6
    assert len(once["train"]) == len(every["train"]) == steps
    for mine, theirs in zip(once["train"], every["train"]):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_fsdp2_options_took_effect(runs):
    fsdp2 = runs["fsdp2"]
    assert fsdp2["gradient_checkpointing"] is True
    # Lean log-probs under FSDP2 (the default): test_two_processes_match_one compares them with one process's
    # full logits.
    assert fsdp2["lean_logprobs"] is True and runs["single"]["lean_logprobs"] is False
    assert fsdp2["dtypes"] == {"policy": "torch.float32", "reference": "torch.float32"}


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_full_state_dict_gathers_the_whole_policy(runs, strategy):
    """What an HF export saves: every tensor of the policy, unsharded, on rank 0."""
    run = runs[strategy]
    assert run["params"].keys() <= run["export_state"].keys()
    assert max_diff({k: run["export_state"][k] for k in run["params"]}, run["params"]) == 0


def test_sharded_and_full_checkpoints_consolidate_to_the_trained_weights(runs, tmp_path):
    sharded = consolidate_checkpoint(runs["ckpt_dir"] / "sharded.ckpt")
    full = consolidate_checkpoint(runs["ckpt_dir"] / "full.ckpt")
    assert (runs["ckpt_dir"] / "sharded.ckpt").is_dir()
    assert sharded["state_dict"].keys() == full["state_dict"].keys()
    assert max_diff(sharded["state_dict"], full["state_dict"]) == 0
    trained = {f"model.{k}": v for k, v in runs["fsdp2"]["params"].items()}
    assert max_diff({k: sharded["state_dict"][k] for k in trained}, trained) == 0
    assert len(sharded["optimizer_states"]) == 1 and sharded["optimizer_states"][0]["state"]
    # A consolidated checkpoint is an ordinary one: DPOModule (and the HF export) load it.
    torch.save(sharded, tmp_path / "one.ckpt")
    module = DPOModule.load_from_checkpoint(tmp_path / "one.ckpt", weights_only=True)
    for name, value in module.model.state_dict().items():
        if f"model.{name}" in trained:
            assert torch.equal(value, trained[f"model.{name}"]), name
    # `python -m dpo_lightning export SHARDED_DIR OUT`: straight from the sharded folder to HF format.
    from transformers import AutoModelForCausalLM

    from dpo_lightning.stages.export import export_checkpoint

    out = export_checkpoint(runs["ckpt_dir"] / "sharded.ckpt", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out)
    for name, value in exported.state_dict().items():
        if f"model.{name}" in trained:
            assert torch.equal(value, trained[f"model.{name}"]), name


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_stays_close(tmp_path):
    """bf16 compute, fp32 reduce: the policy keeps fp32 shards, the reference is stored in bf16,
    and the first-step gradients stay within bf16 rounding of fp32 (measured: 4e-4 of a 0.066 max)."""
    one = run_script(tmp_path, "single", "--strategy", "single")
    mixed = run_script(tmp_path, "mp", "--strategy", "fsdp2", "--mixed-precision")
    assert mixed["dtypes"] == {"policy": "torch.float32", "reference": "torch.bfloat16"}
    assert max_diff(one["grads"], mixed["grads"]) < 5e-3
    assert mixed["train"][0]["train/loss"] == pytest.approx(one["train"][0]["train/loss"], abs=1e-2)


def test_decoder_layers_found_generically():
    for arch, cls in (("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block"), ("qwen2", "Qwen2DecoderLayer")):
        model = DPOModule(model_config=tiny_config(arch)).model
        assert len(decoder_layers(model)) == 2
        assert {c.__name__ for c in decoder_layer_classes(model)} == {cls}


# ---------------------------------------------------------------------------- accumulation


def concat_pairs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two contract batches of equal T -> one: chosen rows of both, then rejected rows of both."""
    ba, bb = a["input_ids"].shape[0] // 2, b["input_ids"].shape[0] // 2
    return {k: torch.cat([a[k][:ba], b[k][:bb], a[k][ba:], b[k][bb:]]) for k in a}


class FirstStepGrads(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}


def train_one_step(data: list, accumulate: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    module = DPOModule(model_config=tiny_config("llama"), optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    grads = FirstStepGrads()
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[grads],
    ).fit(module, DataLoader(data, batch_size=None))
    return grads.grads, {k: v.clone() for k, v in module.model.state_dict().items()}


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_the_pairs():
    """k=2 micro-batches of b=2 pairs (Lightning divides each per-pair mean by k) give the gradient
    of the mean over all 4 pairs: the same SGD update as one batch of 4 pairs."""
    micro = [random_batch(b=2, t=10, seed=1), random_batch(b=2, t=10, seed=2)]
    grads_acc, params_acc = train_one_step(micro, accumulate=2)
    grads_one, params_one = train_one_step([concat_pairs(*micro)], accumulate=1)
    assert max(g.abs().max().item() for g in grads_one.values()) > 1e-3  # a real gradient
    assert max_diff(grads_acc, grads_one) < 1e-6
    assert max_diff(params_acc, params_one) < 1e-6
    # Guard against a vacuous pass: one micro-batch alone gives a different gradient.
    grads_half, _ = train_one_step(micro[:1], accumulate=1)
    assert max_diff(grads_half, grads_one) > 1e-4


FSDP2_EXPORT_SCRIPT = """
import os, sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from tiny import random_batch, tiny_config
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
import dpo_lightning
from dpo_lightning import DPOModule
from dpo_lightning.stages.export import HFExport

# This checkout, not an installed copy.
assert os.path.realpath(dpo_lightning.__file__) == {package!r}, dpo_lightning.__file__
torch.manual_seed(0)
module = DPOModule(model_config=tiny_config("llama"), memory=dict(fsdp_mixed_precision=False),
                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(1, 1), max_steps=2,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    default_root_dir={root!r}, callbacks=[HFExport()])
trainer.fit(module, DataLoader([random_batch(seed=i) for i in range(2)], batch_size=None))
from dpo_lightning.training.distributed import full_state_dict, is_sharded
assert is_sharded(module.model)
torch.save({{k: v.float() for k, v in full_state_dict(module.model).items()}}, {root!r} + "/trained.pt")
"""


def test_fsdp2_fit_ends_with_an_hf_export_of_the_full_weights(tmp_path):
    """HFExport under FSDP2 gathers the sharded policy before saving (here 1 process, a real fully_shard)."""
    from transformers import AutoModelForCausalLM

    script = tmp_path / "fsdp2_export.py"
    package = str((ROOT / "dpo_lightning" / "__init__.py").resolve())
    script.write_text(FSDP2_EXPORT_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path), package=package))
    # The script lives in a temp folder: without PYTHONPATH it would import an installed dpo_lightning.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = torch.load(tmp_path / "trained.pt", weights_only=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export").state_dict()
    assert trained.keys() <= exported.keys()
    assert max(float((exported[k] - v).abs().max()) for k, v in trained.items()) == 0
