# The two commands of the README: `make run` (the main job) and `make test` (the whole suite).
# Both build what they need on a fresh machine: .venv/ (and, for the tests, .venv-sky/ and the
# Debian tools the suite drives: shellcheck, systemd-nspawn).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The pair that works together on x86-64 Linux; a pip constraint file may cap both here.
TORCH := torch==2.14.1 torchvision==0.29.1
SKY_VENV := .venv-sky
SKYPILOT := skypilot==0.14.1

.PHONY: run test bench clean-venv .test-tools

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(SKY_VENV)/.installed:
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/pip install --quiet $(SKYPILOT)
	touch $@

# Debian tools for the systemd, startup-script and nspawn tests (root only; skipped otherwise).
.test-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v shellcheck && command -v systemd-nspawn; } >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck systemd-container >/dev/null; \
	fi

run: $(VENV)/.installed
	$(VENV)/bin/spotrunner run $(ARGS)

test: $(VENV)/.installed $(SKY_VENV)/.installed .test-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/run_all.py $(ARGS)

clean-venv:
	rm -rf $(VENV) $(SKY_VENV)
