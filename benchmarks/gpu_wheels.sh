#!/usr/bin/env bash
# Wheels the GPU machine's image lacks, for tests/test_gpu.py and benchmarks/gpu_check.py there: the image
# has torch, lightning, transformers, accelerate, pyarrow, pandas, ... but not datasets (and its dill,
# multiprocess), jsonargparse (and its signatures extras) or TRL, and that machine reaches no registry.
# Downloads them here, for CPython 3.12 on x86-64 Linux, into .whl/ (ignored by git), ~2 MiB; a `run` call
# carries them (carry [".whl"]) and installs them with --no-index --no-deps (docs/benchmarks.md, "GPU check").
#
#   bash benchmarks/gpu_wheels.sh            # + TRL 1.16 (gpu_check.py's TRL side)
#   bash benchmarks/gpu_wheels.sh --no-trl   # without: gpu_check.py says so and skips that side
#
# Not carried: vllm (its wheel and CUDA libraries are far over the 64 MiB a call carries) and flash-attn
# (PyPI has its sources only); their tests and gpu_check.py's vLLM figure are skipped, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheels=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring-parser==0.18.0
        typeshed-client==2.15.0)
[[ "${1:-}" == "--no-trl" ]] || wheels+=(trl==1.16.0)
rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
ls .whl
du -sh .whl
