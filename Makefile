# The two commands a user needs: `make demo` and `make test`.
# Both create .venv if it is missing and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned here (not only in pyproject) because the CPU wheel 2.13.0 is
# what this project is tested on; a looser requirement can pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/convert demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Every script in bench/ at its --quick sizes (FULL=1: the full sizes, far longer);
# results in bench/out/results.json and .md. The bench extra adds the baselines and plots
# (rwkv, matplotlib) on top of the pinned torch, which pip leaves as it is.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) bench/run_all.py $(if $(FULL),--full,)

clean:
	rm -rf $(VENV) build *.egg-info
