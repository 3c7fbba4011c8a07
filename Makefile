# Two entry points on a fresh clone (Python 3.11, pip, make): `make demo` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The project's own packages: compiled before the tests, since the hundreds of processes they start (tower serve,
# the CLI) would otherwise each compile them again where no import writes bytecode (~0.3 CPU-s a start); a stale .pyc
# is only ignored
SOURCES := tower_core collector reconciler dashboard connectors tests bench

.PHONY: install demo test lint clean

# uv (from PyPI, with pip) installs the dependencies: ~28 s (~49 CPU-s) on a clean machine where pip took ~120 s (~115
# CPU-s). Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on this machine) no import writes
# it, and every process would compile what it imports (tower_core.cli + collector.app: 3.9-4.2 CPU-s, not 1.8)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	($(BIN)/python -m pip install -q uv && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]') \
		|| (echo "make install: uv could not install the project; pip installs it instead" && \
		$(BIN)/python -m pip install -q -e '.[dev]')
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tower demo

# Debian's packages (Chromium, Alertmanager) download and unpack while uv installs the project: CI starts with neither
test:
	bash scripts/system-deps.sh & deps=$$!; $(MAKE) --no-print-directory install; built=$$?; wait $$deps && [ $$built -eq 0 ]
	$(BIN)/ruff check .
	$(BIN)/python -m compileall -q $(SOURCES)
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .tower .pytest_cache .ruff_cache *.egg-info
