"""Generated tokens/s: our batched sampling (trainer.predict, left-padded batches, N samples per prompt in
one generate call, KV cache) against the source article's loop (one prompt and one sample at a time with
``model.generate``), on the same model, prompts and settings, in one process.

    python benchmarks/generation_speed.py [--model runs/tiny_sft/version_0/hf_export] [--prompts 64]
        [--samples 8] [--max-new-tokens 12] [--batch-size 64]

Without ``--model`` it builds the tiny recipe's Llama (random init) with the sort tokenizer. Both sides
sample (temperature 1) with a fixed seed and stop at EOS or max_new_tokens; tokens are counted up to
and including EOS. Prints each side's tokens, seconds and tokens/s, and the ratio (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import lightning as L
import torch

from dpo_lightning.data.prompts import PromptDataModule
from dpo_lightning.data.synthetic import build_tokenizer
from dpo_lightning.generation.module import GenerationModule
from dpo_lightning.models.loading import load_causal_lm
from dpo_lightning.stages.export import export_hf

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
        "tie_word_embeddings": False}


def batched(folder: str, prompts: int, samples: int, max_new_tokens: int, batch_size: int, dataset="synthetic:sort",
            accelerator: str = "cpu", precision: str = "32-true", **module_options) -> tuple[int, float]:
    """Our side: ``trainer.predict`` of a `GenerationModule` (the ``generate`` command's path); (tokens, seconds).

    ``module_options`` go to `GenerationModule` (``backend="vllm"``, ``dtype``, ``vllm``); the vLLM engine is
    started before the clock, as the HF backend's weights are loaded before it."""
    data = PromptDataModule(tokenizer=folder, dataset=dataset, split="validation", limit=prompts,
                            batch_size=batch_size, drop_columns=None)
    data.prompts  # noqa: B018 - tokenize before the clock starts
    module = GenerationModule(model=folder, tokenizer=data.tokenizer, num_samples=samples,
                              max_new_tokens=max_new_tokens, seed=0, **module_options)
    if module.vllm is not None:
        module.vllm.llm()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return module.generated_tokens, time.perf_counter() - start


def one_at_a_time(folder: str, prompts: int, samples: int, max_new_tokens: int) -> tuple[int, float]:
    """The article's loop: for each prompt, for each sample, model.generate on one sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lightning.data.synthetic import load_dataset

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = load_dataset(seed=0)["validation"]["prompt"][:prompts]
    torch.manual_seed(0)
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            for _ in range(samples):
                out = model.generate(**ids, do_sample=True, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an export folder (default: the tiny recipe's Llama, random init)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch on our side")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            tokenizer = build_tokenizer()
            torch.manual_seed(0)
            folder = os.path.join(tmp, "tiny")
            export_hf(load_causal_lm(None, config={**TINY, "vocab_size": len(tokenizer)}), tokenizer, folder)
        ours = batched(folder, args.prompts, args.samples, args.max_new_tokens, args.batch_size)
        loop = one_at_a_time(folder, args.prompts, args.samples, args.max_new_tokens)
    for name, (tokens, seconds) in (("batched (ours)", ours), ("one at a time", loop)):
        print(f"{name:>15}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s")
    print(f"ratio: {(ours[0] / ours[1]) / (loop[0] / loop[1]):.1f}x")


if __name__ == "__main__":
    main()
