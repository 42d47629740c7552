# yolov5-qat: `make test` and `make demo` work on a clean machine; both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv test demo lint clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# tests run on two worker processes (pytest-xdist; worksteal: an idle worker takes queued tests from the busy one, so
# the long end-to-end tests do not leave one core idle at the end); each test uses one torch thread (tests/conftest.py)
test: venv
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# make demo: ReLU parent -> FP32 fine-tune and pow2 QAT -> val -> ONNX QDQ -> val on shapes (FULL=1 also retrains the parent)
demo: venv
	$(PY) demo.py $(if $(FULL),--full,)

# make lint: ruff with the pyproject.toml configuration (line length 120; pycodestyle, pyflakes and import order)
lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
