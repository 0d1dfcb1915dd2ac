# `make demo`: set up .venv and run the main job on the embedded default (synthetic Kvasir).
# `make test`: set up .venv (with test extras) and run the whole test suite.
# KVASIR=path/to/kvasir-dataset-v2(.zip) makes the demo use the real set.
# Both install the exact versions of constraints.txt (pyproject.toml states lower bounds only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
PER_CLASS ?= 60
SEEDS ?= 0 1

.PHONY: demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,test]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m kvasir_dali.demo --out $(DEMO) --per-class $(PER_CLASS) --seeds $(SEEDS) $(if $(KVASIR),--kvasir $(KVASIR))

clean:
	rm -rf $(DEMO) runs
