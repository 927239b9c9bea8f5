# Two commands a new user needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out

.PHONY: setup demo test android-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch + torchvision first: pip takes both from this workplace's local disk.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pocus-edge demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# The Android demo's pure-Kotlin core against golden vectors (installs Debian's kotlin + JDK if missing).
android-test: $(STAMP)
	VENV=$(VENV) bash android_demo/ci_core_tests.sh

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
