# Strata's commands. `make demo` and `make test` set up everything on a fresh machine.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch for development and CI; GPU users: make setup TORCH=torch (or their CUDA wheel).
TORCH ?= torch==2.13.0
NPROC ?= 2
export DS_ACCELERATOR ?= cpu

.PHONY: setup test test-fast lint check-demo demo bench bench-gpu clean-demo docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,merge,harness]"
	touch $@

# Two pytest-xdist workers, one test module each (module fixtures are built once); one thread per
# process, as on the 2-core CI machine; bytecode cached (the suite starts ~100 Python processes).
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE= $(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/lint-imports

check-demo: setup
	$(VENV)/bin/strata check data_recipes/demo.yaml
	$(VENV)/bin/strata prepare data_recipes/demo.yaml --workers $(NPROC)

demo: check-demo
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m pipeline train data_recipes/demo.yaml --run-dir runs/demo
	$(VENV)/bin/strata eval runs/demo
	$(VENV)/bin/strata report runs/demo

bench: check-demo
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_prepare.py --workers $(NPROC)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_selection.py
	$(PY) benchmarks/bench_partial.py
	$(PY) benchmarks/bench_memory.py

# On a GPU machine (after make setup TORCH=torch): Strata vs a bare DeepSpeed loop on every visible GPU.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
bench-gpu: setup
	DS_ACCELERATOR=cuda $(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS) benchmarks/bench_gpu.py

.PHONY: forgetting
forgetting: setup  # English then German with each defence against forgetting (docs/forgetting.md)
	$(PY) benchmarks/forgetting.py

# The manual (docs/) as a website in site/: MkDocs with the Material theme, offline. The recipe
# reference is regenerated from the code first (tests/recipe/test_reference.py fails while it is stale).
docs: setup
	$(VENV)/bin/mkdocs --version >/dev/null 2>&1 || $(PY) -m pip install -q -e ".[docs]"
	$(VENV)/bin/strata schema --markdown --out docs/recipe.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean-demo:
	rm -rf data/demo runs/demo
