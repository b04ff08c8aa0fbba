# Set-up and run targets. Each creates/refreshes .venv and installs the CPU build of torch
# first (pip install torch==2.13.0 takes the file on disk), so the project's torch range
# is already satisfied and no CUDA build is ever downloaded.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: venv demo test stress interop clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The paired trainloop on real ARC pairs: a run killed mid-training (SIGKILL), resumed, killed
# again with its local folder deleted (a recycled VM), restored from the stand-in Drive folder
# drive/, finished, and compared tensor by tensor with an uninterrupted run. Then the listing.
demo: venv
	$(PY) -m ckptctl.trainloop_demo runs drive
	$(VENV)/bin/ckptctl ls runs/demo
	$(VENV)/bin/ckptctl verify drive/demo

# -rfEs: the summary lists failures, errors and every skipped test with its reason.
test: venv
	$(PY) -m pytest -q -rfEs

stress: venv
	$(PY) -m pytest -q -m slow -s -rfEs

# The slow test on real Hugging Face Trainer and Lightning output (skipped by `make stress` when the
# optional interop extra is not installed): installs transformers, accelerate and lightning into .venv.
interop: venv
	$(PY) -m pip install --quiet -e ".[test,interop]"
	$(PY) -m pytest -q -m slow -rfEs tests/test_foreign_interop.py

clean:
	rm -rf $(VENV) runs .pytest_cache
