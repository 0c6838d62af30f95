#!/usr/bin/env bash
# Create .venv and install invardiff with its test tools.
#
# torch is installed first and on its own: `torch==2.13.0` resolves to the CPU wheel on machines that
# carry it locally (no CUDA download) and to the regular CUDA wheel on a GPU box. The project only asks
# for torch>=2.4 after that, which the installed build already satisfies. Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "invardiff installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
