# Two commands a new user needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
# The core-only runtime venv of `make lean-test` (no torch).
LEAN_VENV ?= .venv-lean
# The Python that constraints.txt was recorded on: its exact pins may not exist for another one.
PYTHON_VERSION := 3.11
# Optional: PyTorch's CPU wheel index (README, "Download size") for torch and torchvision without
# the CUDA libraries, e.g. `make setup TORCH_INDEX_URL=...`.
TORCH_INDEX_URL ?=
# numpy + the onnxruntime the Android app pins (android_demo/onnxruntime.version).
APP_ORT_VENV ?= .venv-app-ort
# The serve page's JavaScript (onnxruntime-web), installed from npm by `make web`.
WEB_DIR := pocus_edge/runtime/web

.PHONY: setup check-python demo test lint lean-test android-test app-runtime-test web browser-test constraints clean

setup: $(STAMP)

# The venv's Python if there is one, else $(PYTHON): Python $(PYTHON_VERSION), or one line saying what to do.
check-python:
	@py=$$(test -x $(PY) && echo $(PY) || command -v $(PYTHON)) || { \
	  echo "make: $(PYTHON) not found; install Python $(PYTHON_VERSION) or pass PYTHON=/path/to/python$(PYTHON_VERSION)" >&2; exit 2; }; \
	$$py -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(PYTHON_VERSION)" else \
	  "make: " + sys.executable + " is Python " + v + "; the pinned versions in constraints.txt were recorded on Python $(PYTHON_VERSION): " \
	  "run make PYTHON=python$(PYTHON_VERSION) ... (and make clean first if .venv was made with another Python)")'

# Every package at the exact version the tests ran with (constraints.txt); pyproject.toml keeps
# ranges for people who install pocus-edge into their own environment.
$(STAMP): pyproject.toml constraints.txt | check-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch + torchvision first: the largest wheels, pinned in constraints.txt (a local version
	# such as 2.14.1+cpu from TORCH_INDEX_URL meets the pin).
	$(PY) -m pip install -c constraints.txt $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch torchvision
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Rerunnable: a second run reuses the finished stages in $(DEMO_OUT) (`pocus-edge demo --fresh` starts over).
demo: $(STAMP)
	$(VENV)/bin/pocus-edge demo --out $(DEMO_OUT)

# Browser tests run in `make browser-test` (they need Chromium).
test: $(STAMP)
	$(PY) -m pytest -q -m "not browser"

# onnxruntime-web for the serve page, at the versions of package-lock.json (Debian's nodejs + npm
# are installed if missing); the page serves its files from node_modules, nothing at run time.
web: $(WEB_DIR)/node_modules/.package-lock.json
$(WEB_DIR)/node_modules/.package-lock.json: $(WEB_DIR)/package.json $(WEB_DIR)/package-lock.json
	command -v npm >/dev/null 2>&1 || bash .ci/apt_install.sh nodejs npm
	cd $(WEB_DIR) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error

# The serve page in headless Chromium (Debian's, installed if missing), driven by Playwright.
browser-test: $(STAMP) web
	command -v chromium >/dev/null 2>&1 || bash .ci/apt_install.sh chromium
	$(PY) -m pytest -q -m browser

# ruff with the rules in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(PY) -m ruff check .

# The lean install: a second venv with only the core dependencies streams and benchmarks an ONNX
# model exported by the full venv, and proves torch is not needed (or importable) there.
lean-test: $(STAMP)
	VENV=$(VENV) LEAN_VENV=$(LEAN_VENV) bash .ci/lean_runtime.sh

# The Android demo's pure-Kotlin core against golden vectors (installs Debian's kotlin + JDK if missing).
android-test: $(STAMP)
	VENV=$(VENV) bash android_demo/ci_core_tests.sh

# Every artifact the Android app may load, run in the onnxruntime version the app pins.
app-runtime-test: $(STAMP)
	VENV=$(VENV) APP_ORT_VENV=$(APP_ORT_VENV) bash .ci/app_runtime.sh

# Rewrite constraints.txt from the versions installed in $(VENV).
constraints: $(STAMP)
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LEAN_VENV) $(APP_ORT_VENV) $(DEMO_OUT) .pytest_cache
