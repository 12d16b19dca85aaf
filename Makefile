# Two commands do all the set-up on a fresh machine:
#   make reproduce   the main job on the embedded default (no download)
#   make test        the test suite (what .ci/run calls)
# Both create .venv when missing, installing the exact versions in requirements.lock.
# Override the interpreter with PYTHON=python3.12, the venv with VENV=DIR; LOCK= installs without the lock.
#   make lock         re-resolve the newest versions pyproject.toml allows and rewrite requirements.lock
#   make test-latest  the same tests in .venv-latest with the newest versions pyproject.toml allows (no lock)
#   make mutation     mutation testing of the science code (cosmic-ray; about 25 min on 2 cores from nothing; not in CI)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= requirements.lock
# Extra `pip install` flags: test-latest passes --upgrade --upgrade-strategy eager.
PIP_FLAGS ?=
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
OUT ?= runs/reproduce
# `make reproduce-seeds`: these seeds, each into $(SEEDS_OUT)/seed<N>/, and the report across them in $(SEEDS_OUT).
SEEDS ?= 0 1 2
SEEDS_OUT ?= runs/reproduce-seeds
# `make ablate`: every routing variant of configuration/ablations/ over $(SEEDS), into $(ABLATE_OUT).
ABLATE_OUT ?= runs/ablate
# `make mutation`: sessions and report in $(MUTATION_OUT); MUTATION_ARGS e.g. "--only stats load" or "--rejudge".
MUTATION_OUT ?= runs/mutation
MUTATION_ARGS ?=

CONSTRAINTS := $(if $(LOCK),-c $(LOCK))

.PHONY: setup reproduce reproduce-seeds ablate test test-latest mutation versions lock lint clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip $(CONSTRAINTS)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e ".[test]" $(CONSTRAINTS)
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

ablate: setup
	$(VENV)/bin/moe-vlm ablate --out $(ABLATE_OUT) --seeds $(SEEDS)

reproduce-seeds: setup
	$(VENV)/bin/moe-vlm reproduce --seeds $(SEEDS) --out $(SEEDS_OUT)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Mutation testing (tests/mutation/targets.toml: each module with the tests that cover it). Exits non-zero when
# under 90 % of the non-equivalent mutants are killed. An interrupted run continues where it stopped.
mutation: setup
	$(PY) -m pip install --quiet -e ".[mutation]" $(CONSTRAINTS)
	$(PY) tests/mutation/run_mutation.py --out $(MUTATION_OUT) --jobs 2 $(MUTATION_ARGS)

# The versions that matter most, as installed in $(VENV).
versions: setup
	@$(PY) -c 'import importlib.metadata as m, platform; print(f"Python {platform.python_version()}", *(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "gradio", "open_clip_torch")), sep=", ")'

# The same tests against the newest releases pyproject.toml allows: upgrade $(LATEST_VENV) every time, no lock.
test-latest:
	rm -f $(LATEST_VENV)/.installed
	$(MAKE) --no-print-directory versions test VENV=$(LATEST_VENV) LOCK= PIP_FLAGS="--upgrade --upgrade-strategy eager"

# Resolve afresh in a throwaway venv (the newest versions pyproject.toml allows, within any constraints pip's own
# config adds) and pin every installed package. Run it after changing a dependency, then `make test`.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test,mutation]"
	$(LOCK_VENV)/bin/python -m pip check
	{ echo "# The tested environment: every package pinned, for pip as a constraints file (pip install -c)."; \
	  echo "# Written by \`make lock\` on $$(date -u '+%Y-%m-%d %H:%M UTC'): a fresh venv, \`pip install --upgrade pip\`,"; \
	  echo "# \`pip install -e \".[test,mutation]\"\` (the newest versions pyproject.toml allows), \`pip freeze --all --exclude-editable\`."; \
	  $(LOCK_VENV)/bin/python -c 'import platform as p, sys; libc = " ".join(p.libc_ver()).strip(); print(f"# Resolved on {p.python_implementation()} {p.python_version()}, {p.system()} {p.machine()}" + (f", {libc}" if libc else "") + f": for that platform and Python {sys.version_info.major}.{sys.version_info.minor}")'; \
	  echo "# (torch's nvidia-*, cuda-* and triton pins are Linux x86_64 ones). Elsewhere pins that do not apply are ignored;"; \
	  echo "# where one cannot install, \`make setup LOCK=\` installs without the lock, or run \`make lock\` there."; \
	  c="$$($(LOCK_VENV)/bin/python -m pip config list | sed -n "s/^[^=]*\.constraint='\(.*\)'$$/\1/p" | paste -sd ' ')"; \
	  if [ -n "$$c" ]; then echo "# pip's config added constraints ($$c): $$(grep -hv -e '^#' -e '^$$' $$c | paste -sd ' ')"; fi; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) .system-deps runs
