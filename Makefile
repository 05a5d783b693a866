# make demo / make test / make bench / make screenshot — each creates $(VENV) and installs what it needs first.

PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
# Debian packages for a virtual X display and Qt 6's xcb platform plugin (napari's canvas in the GUI tests).
XVFB_PACKAGES := xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0 libxcb-render-util0 \
	libxcb-shape0 libxcb-randr0 libxcb-xkb1 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3 \
	libglib2.0-0

.PHONY: help deps xvfb test lint demo bench screenshot clean

help:
	@echo "make demo        run the end-to-end demo (writes demo_output/)"
	@echo "make test        import contracts, manifest validation and the test suite"
	@echo "make bench       run the benchmarks (benchmarks/run_all.py)"
	@echo "make screenshot  regenerate the README screenshots"
	@echo "variables: PY=$(PY) VENV=$(VENV) TORCH=$(TORCH)"

# torch goes in first and pinned: asked for through the project's `torch>=2.3`, pip could pick a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[testing]"
	touch $@

deps: $(VENV)/.installed

# pytest-xvfb starts the virtual display itself; this only makes sure Xvfb and Qt's X libraries are installed.
xvfb:
	@missing=no; command -v Xvfb >/dev/null 2>&1 || missing=yes; \
	if command -v dpkg-query >/dev/null 2>&1; then \
		for p in $(XVFB_PACKAGES); do \
			dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing=yes; \
		done; \
	fi; \
	if [ $$missing = yes ]; then \
		if [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; else SUDO=; fi; \
		echo "installing $(XVFB_PACKAGES)"; \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $(XVFB_PACKAGES); \
	fi

test: deps xvfb
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/ruff check napari_metahistoseg tests benchmarks scripts
	$(BIN)/npe2 validate napari-metahistoseg
	$(BIN)/python -m pytest -q

lint: deps
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/ruff check napari_metahistoseg tests benchmarks scripts

demo: deps
	$(BIN)/python -m napari_metahistoseg.demo --out demo_output

bench: deps
	$(BIN)/python benchmarks/run_all.py

screenshot: deps xvfb
	$(BIN)/python scripts/screenshot.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo_output
