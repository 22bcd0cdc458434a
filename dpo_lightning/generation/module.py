"""Sampling N responses per prompt from a policy through ``trainer.predict`` (`GenerationModule`).

`GenerationModule` is a LightningModule whose ``predict_step`` samples ``num_samples`` responses
for each prompt of a left-padded batch (`data.prompts.PromptDataModule`) with the model's KV cache,
each response from a random stream of its own (`sampling.RowSeededSampler`); precision, devices and
strategy come from the Trainer as in training, and each rank takes its own share of the prompts.
``backend="vllm"`` samples the same requests with vLLM instead (`vllm_backend.py`: one process, tensor
parallel, the weights in ``dtype``). `writer.JudgedSamplesWriter` judges and writes what it samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from dpo_lightning.data.tokenizer import resolve_tokenizer
from dpo_lightning.generation import vllm_backend
from dpo_lightning.generation.sampling import RowSeededSampler, decode_response, response_seed
from dpo_lightning.generation.sampling import until_eos as _until_eos
from dpo_lightning.generation.vllm_backend import VLLMOptions, VLLMSampler
from dpo_lightning.models.loading import float32_buffers, load_causal_lm, restore_float32_buffers
from dpo_lightning.stages.base import stage_class_of
from dpo_lightning.training.integrity import check_checkpoint, is_training_checkpoint

SAMPLER = "row_seeded"  # in every record's settings: records of an earlier sampler are not mixed in


class GenerationModule(L.LightningModule):
    """Samples ``num_samples`` responses per prompt from a causal LM (``trainer.predict``)."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        num_samples: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        seed: int = 0,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        backend: Literal["hf", "vllm"] = "hf",
        vllm: VLLMOptions | None = None,
    ) -> None:
        """
        Args:
            model: The policy: a hub id, an export folder (``runs/<name>/version_N/hf_export``), a training
                checkpoint (``.ckpt``) of any stage, or a model.
            tokenizer: The policy's tokenizer (hub id, path or object); the CLI links ``data.tokenizer``.
            num_samples: Responses sampled per prompt.
            max_new_tokens: Longest response in tokens (a response that reaches it has no EOS).
            temperature: Sampling temperature.
            top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: off).
            top_k: Keep the k most likely tokens (0: off).
            do_sample: Sample (True) or decode greedily (False; then num_samples must be 1).
            seed: Seed of the sampling: response k of a prompt is drawn from a random stream seeded from (seed,
                prompt id, k), the same in every run, batch and batch size.
            dtype: Weights dtype when loading: float32, bfloat16, float16 or auto (the vLLM backend's dtype too).
            attn_implementation: Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); HF backend only.
            trust_remote_code: Allow models whose code lives on the hub.
            backend: Who samples: ``hf`` (transformers ``generate`` under the Trainer; CPU or GPUs, DDP) or ``vllm``
                (a vLLM engine on one process, tensor parallel; needs ``pip install 'dpo_lightning[vllm]'``).
                The same prompts and per-response seeds; the records say which sampled them (docs/generate.md).
            vllm: The vLLM engine's options (backend vllm only): tensor_parallel_size, gpu_memory_utilization,
                max_model_len, enforce_eager.
        """
        super().__init__()
        # A re-run samples only what is left: a rank whose share is all done has no batch (the shares are fixed,
        # so each batch is the uninterrupted run's), which Lightning would refuse on the other ranks' behalf.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        vllm_backend.check_backend(backend, vllm, attn_implementation, temperature)
        if backend == "vllm":
            vllm_backend.require_vllm()  # before anything loads
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
        if not do_sample and num_samples != 1:
            raise ValueError("greedy decoding (do_sample=False) gives one response per prompt: set num_samples=1")
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.save_hyperparameters(ignore=["model", "tokenizer", "vllm"])
        self.hparams["model"] = model if isinstance(model, str) else f"<{type(model).__name__} instance>"
        options = VLLMOptions(**vllm) if isinstance(vllm, Mapping) else vllm
        self.hparams["vllm"] = asdict(options) if options is not None else None
        self.tokenizer = resolve_tokenizer(tokenizer, trust_remote_code)
        if self.tokenizer is None:
            raise ValueError("GenerationModule needs the policy's tokenizer (tokenizer=...)")
        self.model: PreTrainedModel | None = None
        self.vllm: VLLMSampler | None = None
        if backend == "vllm":  # the engine starts at the first batch (`VLLMSampler`)
            self.vllm = VLLMSampler(model, self.tokenizer, options or VLLMOptions(), dtype, seed, trust_remote_code)
        else:
            self.model = _load_policy(model, self.tokenizer, dtype=dtype, attn_implementation=attn_implementation,
                                      trust_remote_code=trust_remote_code)
            self.model.eval()
        self.generated_tokens = 0  # new tokens (up to EOS) sampled by this rank, for tokens/s
        self.stop_requested: Callable[[], bool] | None = None  # set by the writer: ends a batch early when true
        self._fp32_buffers: dict[str, torch.Tensor] = {}  # taken at setup, restored after a bf16-true/16-true cast

    def setup(self, stage: str) -> None:
        if self.vllm is not None:  # the CLI checked the config; a Trainer built in Python is checked here
            strategy = type(self.trainer.strategy).__name__
            vllm_backend.check_trainer(self.trainer.strategy.root_device.type, self.trainer.world_size, 1,
                                       "single_device" if strategy == "SingleDeviceStrategy" else strategy,
                                       self.trainer.precision)
        # Before the precision plugin casts the module (bf16-true): RoPE's inv_freq and other float32 buffers.
        self._fp32_buffers = float32_buffers(self)

    def teardown(self, stage: str) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def on_predict_start(self) -> None:
        restore_float32_buffers(self, self._fp32_buffers)

    def settings(self) -> dict[str, Any]:
        """What decided the samples, written with every record (``sampler``: how the random numbers are drawn)."""
        return sample_settings(self.hparams)

    @torch.no_grad()
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]] | None:
        """One record per prompt of the batch: ``prompt_id``, ``index``, ``prompt``, ``responses`` (N strings).

        Response k of a prompt is sampled from a random stream of its own, seeded from (``seed``, prompt id,
        k) (`sampling.RowSeededSampler`): it does not depend on the batch, the batch size or a restart.
        None when a preemption cut the batch short (`stop_requested`): nothing of it is to be written.
        """
        hp = self.hparams
        if self.vllm is not None:
            return self._vllm_step(batch)
        n = hp.num_samples
        width = batch["input_ids"].shape[1]
        input_ids = batch["input_ids"].repeat_interleave(n, dim=0)  # (B * N, T): prompt i in rows i*N .. i*N + N - 1
        attention_mask = batch["attention_mask"].repeat_interleave(n, dim=0)
        processors = LogitsProcessorList()
        if hp.do_sample:
            seeds = [response_seed(hp.seed, pid, k) for pid in batch["prompt_id"] for k in range(n)]
            processors.append(RowSeededSampler(seeds, width, hp.max_new_tokens, hp.temperature, hp.top_k, hp.top_p))
        stop = _StopWhen(self.stop_requested)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=hp.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
            do_sample=False, temperature=None, top_p=None, top_k=None,  # the sampler above samples
            logits_processor=processors, stopping_criteria=StoppingCriteriaList([stop]),
        )  # (B * N, T + new)
        if stop.fired:
            return None
        new = out[:, width:]  # (B * N, new)
        records = []
        for i, (pid, index) in enumerate(zip(batch["prompt_id"], batch["index"].tolist())):
            prompt_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            responses = []
            for row in new[i * n : (i + 1) * n].tolist():
                row = _until_eos(row, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
                self.generated_tokens += len(row)
                responses.append(decode_response(self.tokenizer, prompt_ids, row))
            records.append({"prompt_id": pid, "index": index, "prompt": json.loads(batch["prompt"][i]),
                            "responses": responses})
        return records

    def _vllm_step(self, batch: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The batch's records from vLLM: the same requests (prompt ids, seeds) and records as the HF path.
        vLLM samples a batch whole: a preemption is honoured before it starts (None: nothing to write)."""
        if self.stop_requested is not None and self.stop_requested():
            return None
        hp = self.hparams
        requests = vllm_backend.build_requests(batch, hp.num_samples, hp.seed, hp.do_sample)
        arguments = [vllm_backend.sampling_arguments(
            r, max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
            do_sample=hp.do_sample, eos=self.tokenizer.eos_token_id) for r in requests]
        records, tokens = vllm_backend.to_records(batch, requests, self.vllm.sample(requests, arguments),
                                                  self.tokenizer)
        self.generated_tokens += tokens
        return records


def sample_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every record carries: the sampling options and the ``sampler`` (``row_seeded`` for the HF
    backend, ``vllm_seeded`` for vLLM), so a folder's records of one backend are never mixed with the other's."""
    keys = ("model", "num_samples", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed")
    sampler = vllm_backend.SAMPLER if hparams.get("backend", "hf") == "vllm" else SAMPLER
    return {**{k: hparams[k] for k in keys}, "sampler": sampler}


class _StopWhen(StoppingCriteria):
    """Ends ``generate`` at the next token once ``requested()`` is true (a preemption); records ``fired``."""

    def __init__(self, requested: Callable[[], bool] | None) -> None:
        self.requested, self.fired = requested, False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or bool(self.requested is not None and self.requested())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def _load_policy(model: str | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> PreTrainedModel:
    """A causal LM from a hub id, an export folder, a model, or any stage's training checkpoint (whose
    module is rebuilt with ``tokenizer``: a tokenizer given to training as an object is not in it)."""
    if isinstance(model, str) and is_training_checkpoint(model):

        check_checkpoint(model)
        header = torch.load(model, map_location="cpu", weights_only=True, mmap=True)
        module = stage_class_of(header).load_from_checkpoint(
            model, map_location="cpu", weights_only=True, tokenizer=tokenizer
        )
        policy = module.model
        return policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    return load_causal_lm(model, **kwargs)


__all__ = ["GenerationModule", "VLLMOptions", "decode_response", "sample_settings"]
