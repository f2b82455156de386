#!/usr/bin/env bash
# Build the isolated AdapterHub `adapters` venv that tests/adapters_check.py runs in.
#
#   bash tests/tools/adapters_ref/INSTALL.sh VENV_DIR
#
# Built like ../shared/tools/pyreft_ref/INSTALL.sh builds pyreft's: never a dependency of
# reftsearch (adapters 1.3.0 pins transformers ~=4.57.6, reftsearch runs transformers 5).
# Needs python3.11 with pip. On this workplace 'pip install torch==2.13.0' takes a CPU wheel
# from local disk (/opt/wheels); plain 'torch' would pull a multi-GB CUDA build.
#
# Pins (every package 'import adapters' loads; found with 'pip install adapters==1.3.0' and
# 'pip freeze', 2026-12):
#   adapters==1.3.0          the version the export targets (reftsearch/export/adapters.py)
#   transformers==4.57.6     adapters 1.3.0 requires ~=4.57.6
#   huggingface-hub==0.36.2  transformers 4.57 requires <1.0
#   tokenizers==0.22.2       transformers 4.57 requires <=0.23.0
# requirements.lock.txt is that venv's 'pip freeze': the rest is installed as it was.
set -euo pipefail
VENV="${1:?usage: INSTALL.sh VENV_DIR}"
PY="${PYTHON:-python3.11}"
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 ))s] $*" >&2; }

step "creating venv $VENV"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step "1/2 torch (CPU wheel from local disk)"
"$PIP" install -q torch==2.13.0

step "2/2 adapters and the transformers it pins (every other package as locked)"
"$PIP" install -q -c "$(dirname "$0")/requirements.lock.txt" adapters==1.3.0 \
    transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2 safetensors==0.8.0 \
    numpy==2.4.6

step "smoke test"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import adapters, torch, transformers
from adapters import DiReftConfig, LoReftConfig, NoReftConfig
print("ok:", {p: version(p) for p in ("adapters", "transformers", "torch", "numpy")})
PY
"$PIP" freeze > "$VENV/adapters-ref-freeze.txt"  # written last: the venv is complete
step "done: $VENV ($(du -sh "$VENV" | cut -f1)); freeze in $VENV/adapters-ref-freeze.txt"
