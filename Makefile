# Two commands from a fresh clone: `make demo` and `make test`. Each creates or reuses
# .venv, installs torch and every dependency, builds and installs kquant, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kquant-installed
NATIVE := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: demo test test-all install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) requirements.txt setup.py pyproject.toml $(NATIVE)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kquant demo

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not cuda"

test-all: $(STAMP)
	KQUANT_SLOW=1 $(PY) -m pytest tests -q

bench: $(STAMP)
	bash bench/run_cpu.sh $(PY)

clean:
	rm -rf build *.egg-info kquant/*.so $(VENV)
