"""DPOModule end to end on tiny random-init models: invariants, training, checkpoints."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dpo_lightning import DPOModule
from dpo_lightning.stages.options import MemoryOptions
from dpo_lightning.training.metrics import METRIC_NAMES

from tiny import VOCAB, random_batch, tiny_config


def make_module(arch="llama", **kw) -> DPOModule:
    return DPOModule(model_config=tiny_config(arch), **kw)


def trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kw})


def batches(n: int, b: int = 2, t: int = 10):
    return [random_batch(b=b, t=t, seed=i) for i in range(n)]


def loader(data):
    return DataLoader(data, batch_size=None)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_step0_loss_is_ln2_and_rewards_zero(arch):
    module = make_module(arch)
    out, policy, ref = module(random_batch())
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    torch.testing.assert_close(policy.logps, ref, rtol=0, atol=0)


def test_gradients_reach_only_the_policy():
    module = make_module()
    module.train()
    # At step 0 the DPO gradient is -beta/2 * d(log-ratio margin): non-zero although policy == ref.
    module(random_batch())[0].losses.mean().backward()
    assert all(p.grad is None for p in module.ref_model.parameters())
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())


def test_reference_stays_in_eval_and_dropout_is_off():
    module = DPOModule(model_config={**tiny_config("gpt2"), "resid_pdrop": 0.5, "embd_pdrop": 0.5})
    module.train()
    assert module.model.training and not module.ref_model.training
    assert all(m.p == 0.0 for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
    kept = DPOModule(model_config={**tiny_config("gpt2"), "resid_pdrop": 0.5}, disable_dropout=False)
    assert any(m.p == 0.5 for m in kept.model.modules() if isinstance(m, torch.nn.Dropout))


def test_few_steps_change_every_policy_parameter_and_no_reference_parameter():
    module = make_module(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    policy0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    ref0 = {k: v.clone() for k, v in module.ref_model.state_dict().items()}
    trainer(max_steps=4).fit(module, loader(batches(4)))
    for name, value in module.model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer, not a parameter
        assert not torch.equal(value, policy0[name]), name
    for name, value in module.ref_model.state_dict().items():
        assert torch.equal(value, ref0[name]), name


def test_validate_returns_trl_named_metrics_matching_a_hand_computation():
    module = make_module()
    data = batches(3, b=2)
    result = trainer().validate(module, loader(data), verbose=False)[0]
    assert set(result) >= {f"val/{n}" for n in METRIC_NAMES}
    # The reference equals the policy: every reward is 0, so accuracy 0 (ties are wrong), loss ln 2.
    assert result["val/rewards/accuracies"] == 0.0
    assert result["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # logps/chosen is the mean over all 6 chosen sequences of their summed log-probs.
    with torch.no_grad():
        chosen = torch.cat([module(b)[1].logps[:2] for b in data])
    assert result["val/logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)


def test_train_metrics_are_logged_over_the_whole_window():
    """With log_every_n_steps=2, each logged value covers both batches of its window."""
    logged = []

    class Capture(L.pytorch.loggers.Logger):
        name, version = "capture", 0

        @property
        def experiment(self):
            return None

        def log_hyperparams(self, *a, **k):
            pass

        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    module = make_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    data = batches(4, b=2)
    trainer(max_steps=4, logger=Capture(), log_every_n_steps=2).fit(module, loader(data))
    losses = [m["train/loss"] for _, m in logged if "train/loss" in m]
    assert len(losses) == 2
    # lr 0: the policy stays equal to the reference, so every per-pair loss is ln 2.
    assert losses == pytest.approx([math.log(2)] * 2, abs=1e-6)
    logps = [m["train/logps/chosen"] for _, m in logged if "train/logps/chosen" in m]
    with torch.no_grad():
        window = [torch.cat([module(b)[1].logps[:2] for b in data[i : i + 2]]).mean().item() for i in (0, 2)]
    assert logps == pytest.approx(window, rel=1e-5)


def test_learns_a_preference_far_above_chance():
    """Chosen responses use even token ids, rejected odd ones; held-out pairs have new prompts."""

    def pairs(n, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            b, p, r = 8, 4, 4
            prompt = torch.randint(1, VOCAB, (b, p), generator=g)
            chosen = torch.randint(0, VOCAB // 2, (b, r), generator=g) * 2
            rejected = torch.randint(0, VOCAB // 2, (b, r), generator=g) * 2 + 1
            ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
            labels = ids.clone()
            labels[:, :p] = -100
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        return out

    module = make_module(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_ratio=0.0)
    before = trainer().validate(module, loader(pairs(4, seed=99)), verbose=False)[0]
    trainer(max_steps=150).fit(module, loader(pairs(150, seed=0)))
    after = trainer().validate(module, loader(pairs(4, seed=99)), verbose=False)[0]
    assert before["val/rewards/accuracies"] == 0.0
    assert after["val/rewards/accuracies"] >= 0.9
    assert after["val/loss"] < math.log(2) - 0.1


def _ref_keys(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [k for k in state if k.startswith("reference.model.")]


def test_loads_from_a_saved_model_and_checkpoints_leave_the_rebuildable_reference_out(tmp_path):
    source = make_module().model
    source.save_pretrained(tmp_path / "policy")
    module = DPOModule(model=str(tmp_path / "policy"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    for (name, a), b in zip(source.state_dict().items(), module.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert module.model.training  # from_pretrained returns eval mode; the policy must train
    t = trainer(max_steps=2)
    t.fit(module, loader(batches(2)))
    t.save_checkpoint(tmp_path / "last.ckpt")
    assert _ref_keys(tmp_path / "last.ckpt") == []  # rebuilt from tmp_path/policy on load

    restored = DPOModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    for a, b in zip(module.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(source.state_dict().values(), restored.ref_model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(not p.requires_grad for p in restored.ref_model.parameters())


def test_checkpoints_keep_a_reference_that_cannot_be_rebuilt(tmp_path):
    module = make_module(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    t = trainer(max_steps=2)
    t.fit(module, loader(batches(2)))
    t.save_checkpoint(tmp_path / "last.ckpt")
    assert _ref_keys(tmp_path / "last.ckpt")
    torch.manual_seed(123)  # a fresh random init would differ from the original reference
    restored = DPOModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    for a, b in zip(module.ref_model.state_dict().values(), restored.ref_model.state_dict().values()):
        assert torch.equal(a, b)


def test_lean_logprobs_under_fsdp2_is_refused_for_a_model_that_soft_caps_its_logits():
    """Under FSDP2 the lean path runs the model's own forward with an identity head, so a logit transform inside
    that forward (Gemma 2's soft-cap) would be applied to hidden states: refused when asked for explicitly (the
    default falls back to full logits). Plain heads are tested on 2 processes in tests/test_distributed.py."""
    from dpo_lightning.models.lm_head import lean_unsupported

    module = make_module(memory=MemoryOptions(lean_logprobs=True))
    assert lean_unsupported(module.model, sharded=True) is None
    module.model.config.final_logit_softcapping = 30.0
    assert "soft-caps" in lean_unsupported(module.model, sharded=True)
    assert lean_unsupported(module.model) is None  # unsharded, the lean path applies the soft-cap itself
    module._device_mesh = object()  # what ModelParallelStrategy hands the module before configure_model
    with pytest.raises(ValueError, match="lean_logprobs under ModelParallelStrategy"):
        module.configure_model()
