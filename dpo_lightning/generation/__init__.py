"""Sample and judge: responses from a policy through ``trainer.predict``, judged, paired, written crash-safe.

- `module`: `GenerationModule` (N samples per prompt); `vllm_backend`: its vLLM sampler (``backend="vllm"``,
  optional); `writer`: `JudgedSamplesWriter` (judge, durable output, pairs);
- `sampling`: batched generation with per-response seeds;
- `judges/`: the `Judge` interface (`base`), one file per kind (`function`, `reward_model`, `llm`), the spec ->
  class table (`registry`);
- `pairing`: judged samples -> preference pairs;
- `samples_io`: the samples and pairs files of a generate folder; `manifest`: its manifest.json.
"""

from dpo_lightning.generation.module import GenerationModule, decode_response
from dpo_lightning.generation.writer import JudgedSamplesWriter

__all__ = ["GenerationModule", "JudgedSamplesWriter", "decode_response"]
