# Two commands on a fresh machine: `make demo` (main job on the embedded shapes data) and `make test`.
# Both create .venv and install what they need: torch is pinned to the CPU build first, then the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install speech-deps browser-deps demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[hf,serve,onnx,tensorboard,dev]"
	touch $(STAMP)

install: $(STAMP)

# espeak-ng speaks captions for `polyalign data speech`; installed from Debian when missing (needs root).
speech-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } \
	  || echo "warning: could not install espeak-ng (apt-get install -y espeak-ng); speech tests will be skipped"

# Chromium and its driver run the search page's browser test (tests/test_browser.py); installed from Debian when missing.
browser-deps:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
	  || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	  || echo "warning: could not install chromium (apt-get install -y chromium chromium-driver); the browser test will be skipped"

demo: $(STAMP)
	$(BIN)/polyalign demo

test: $(STAMP) speech-deps browser-deps
	$(BIN)/python -m pytest

# Side-by-side performance table (benchmarks/results/bench.md); takes several minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs cache
