"""Test helpers: tiny random-init model configs and hand-made batches (nothing downloaded)."""

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.stages.export import export_hf

VOCAB = 64

# Tiny random-init configs, one per architecture family the tests cover.
TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "qwen2": dict(
        model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
}

# Small, but with matrices large enough for bf16 kernels to be the ones a real model uses; head size 32 (vLLM's
# CPU attention takes 32 and up, not tiny_config's 8).
SMALL_LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, vocab_size=512)
# Greedy comparisons across kernels need margins between the top two logits far above the kernels' rounding:
# a wide init makes the random model's logits large.
PEAKY = {**SMALL_LLAMA, "initializer_range": 0.5}


def tiny_config(arch: str = "llama", vocab_size: int = VOCAB) -> dict:
    return {**TINY_CONFIGS[arch], "vocab_size": vocab_size}


def random_batch(b: int = 3, t: int = 10, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of 2b rows following the batch contract, prompts of varying length."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (2 * b, t), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(2 * b):
        prompt = 2 + row % 3
        length = t - (row * 7) % 4
        labels[row, :prompt] = -100
        attention_mask[row, length:] = 0
        labels[row, length:] = -100
        input_ids[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ListLogger(Logger):
    """Keeps the logged ``train/*`` metrics (or those of other ``prefixes``) by step, to compare runs exactly."""

    name, version = "list", 0

    def __init__(self, prefixes: tuple[str, ...] = ("train/",)) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.rows: dict[int, dict[str, float]] = {}

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(step, {}).update({k: float(v) for k, v in metrics.items() if k.startswith(self.prefixes)})


class Crash(RuntimeError):
    pass


class CrashAfterStep(L.Callback):
    """Die at the start of the batch after step ``step``, once its checkpoint is on disk (every rank)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"injected crash after step {self.step}")


class SignalAtBatch(L.Callback):
    """Send this process ``signum`` at the start of training batch ``batch`` (a scheduler's preemption)."""

    def __init__(self, batch: int, signum: int = 15) -> None:
        self.batch = batch
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            import os

            os.kill(os.getpid(), self.signum)


def save_sort_policy(folder) -> str:
    """A tiny random-init Llama with the sorting task's tokenizer (seed 0), saved as an export folder in ``folder``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = load_causal_lm(None, config={**tiny_config(), "vocab_size": len(tokenizer)})
    export_hf(model, tokenizer, folder)
    return str(folder)


def save_peaky_policy(folder) -> str:
    """A `PEAKY` Llama with the sorting task's tokenizer (seed 0), saved as an export folder (float32) in ``folder``:
    what the greedy comparisons across kernels (HF and vLLM, CPU and CUDA) decode with."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = load_causal_lm(None, config={**PEAKY, "vocab_size": len(tokenizer)})
    export_hf(model, tokenizer, folder)
    return str(folder)


def sort_prompts(**kwargs) -> PromptDataModule:
    """6 validation prompts of the sorting task in batches of 3 (``kwargs`` override)."""
    options = {"tokenizer": "synthetic:sort", "dataset": "synthetic:sort", "split": "validation", "limit": 6,
               "batch_size": 3, **kwargs}
    return PromptDataModule(**options)
