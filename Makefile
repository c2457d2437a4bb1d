# lfmri — one-command set-up, tests, lint and the demo. Every target that needs the environment depends on
# the stamp file, so `make test` or `make demo` work alone on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bm3d]'
	touch $(STAMP)
	@echo "lfmri is installed in $(VENV): run 'source $(BIN)/activate' (or call $(BIN)/lfmri)"

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	bash experiments/demo.sh

clean:
	rm -rf $(VENV) runs demo_out
