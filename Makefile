# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU hosts take the local CPU wheel; a GPU host sets TORCH_SPEC (see README).
TORCH_SPEC ?= torch==2.13.0
DEBIAN_TOOLS := dcmtk dicom3tools orthanc chromium chromium-driver

.PHONY: setup run demo test lint typecheck debian-tools bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/radfinder-node serve

# A node in this process, a generated chest CT sent to it, the findings printed and drawn.
demo: setup
	$(VENV)/bin/radfinder-node demo

debian-tools:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc  >/dev/null || missing="$$missing orthanc"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian tools:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: setup debian-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

bench: setup debian-tools
	$(PY) bench/ingest.py
	$(PY) bench/volume.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
