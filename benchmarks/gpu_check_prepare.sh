#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.py needs on a GPU machine that cannot download:
#   .gpu_assets/tokenizer  the embedded SmolLM2 tokenizer (the model weights stay behind)
#   .whl/                  wheels of emguard's dependencies that such an image often lacks
#                          (Python 3.12, x86-64), at the versions of requirements.lock
# Both folders are git-ignored; carry them to the machine, then there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --tokenizer .gpu_assets/tokenizer --out OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/gpu_check.py --export-tokenizer .gpu_assets/tokenizer
# Present in the usual CUDA images (torch, transformers, peft, accelerate, numpy, pyarrow,
# typer, rich, tqdm, safetensors, pyyaml, matplotlib, pandas) are not fetched.
NEEDED="pydantic pydantic_core annotated-types typing-inspection typing_extensions datasets dill
multiprocess gguf openai jiter distro sniffio bandit stevedore"
rm -rf .whl && mkdir -p .whl
for name in $NEEDED; do
  spec=$(grep -i -E "^${name//_/[-_]}==" requirements.lock || true)
  [ -n "$spec" ] || spec=$name
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
du -sh .whl .gpu_assets
