# glm5: `make demo` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-random demo lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# prints which tests were skipped and why (-ra); in CI (CI=true) only accelerator tests may skip
test: venv
	$(PY) -m pytest -q -ra tests

# the suite in a random order (module buckets shuffled too); reproduce a run with SEED=<the seed it prints>
test-random: venv
	$(PY) -m pytest -q -ra -p random_order --random-order-bucket=global $(if $(SEED),--random-order-seed=$(SEED)) tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) -m glm5.demo

# formatting and lint rules: pyproject.toml [tool.ruff]; `make format` applies the formatter
lint: venv
	$(VENV)/bin/ruff format --check glm5 tests benchmarks
	$(VENV)/bin/ruff check glm5 tests benchmarks

format: venv
	$(VENV)/bin/ruff format glm5 tests benchmarks
	$(VENV)/bin/ruff check --fix glm5 tests benchmarks

bench: venv
	$(PY) benchmarks/bench_model.py

# On a machine with a CUDA GPU, in one call (< 5 min): the `gpu`-marked tests, then a short decode (eager vs
# compiled + CUDA graphs) / prefill / training-step benchmark -> benchmarks/results/gpu_check.{json,md}, or OUT=DIR.
# Exits 2 with "no CUDA device" anywhere else.
.PHONY: gpu-check
gpu-check: venv
	$(PY) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT))

# Mutation audit (tests/mutants.py): each curated bug, applied to a temporary copy, must fail the tests that claim
# it (~8 min on 2 cores). MUTANTS=name1,name2 runs a subset; `$(PY) tests/mutants.py --list` shows them all.
.PHONY: mutants
mutants: venv
	$(PY) tests/mutants.py $(if $(MUTANTS),--only $(MUTANTS))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
