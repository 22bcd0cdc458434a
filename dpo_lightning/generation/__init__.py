"""Sample and judge: responses from a policy through ``trainer.predict``, judged, paired, written crash-safe.

- `module`: `GenerationModule` (N samples per prompt) and `JudgedSamplesWriter` (judge, durable output, pairs);
- `sampling`: batched generation with per-response seeds;
- `judges`: the `Judge` interface, function and reward-model judges, the spec -> class table;
- `llm_judges`: LLM-as-judge (pairwise and score), named in that table as ``"module:Class"``;
- `pairing`: judged samples -> preference pairs;
- `samples_io`: the samples, pairs and manifest files of a generate folder.
"""

from dpo_lightning.generation.module import GenerationModule, JudgedSamplesWriter, decode_response

__all__ = ["GenerationModule", "JudgedSamplesWriter", "decode_response"]
