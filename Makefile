# Two commands do all the set-up on a fresh machine:
#   make reproduce   the main job on the embedded default (no download)
#   make test        the test suite (what .ci/run calls)
# Both create .venv when missing. Override the interpreter with PYTHON=python3.12.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/reproduce

.PHONY: setup reproduce test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# System packages, each skipped when already present: a Java runtime for pycocoevalcap (PTB tokenizer, METEOR)
# and Debian's chromium for the Space's real-browser test (driven by Playwright; never `playwright install`).
.system-deps:
	@command -v java >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless; }
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@touch $@

setup: $(VENV)/.installed .system-deps

reproduce: setup
	$(VENV)/bin/moe-vlm reproduce --out $(OUT)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .system-deps runs
