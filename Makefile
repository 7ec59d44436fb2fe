PYTHON ?= python

.PHONY: demo test lint install

install:
	$(PYTHON) -m pip install --quiet -r requirements.txt

# The main job on the built-in default: whatever stages exist so far, on the CPU.
demo: install
	$(PYTHON) demo.py

# Two pytest-xdist workers: most tests are single-threaded subprocesses, so one worker leaves a core idle.
TEST_WORKERS ?= 2

test:
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -n $(TEST_WORKERS)
