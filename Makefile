# Voice appliance — build, run and test on Debian 12.
#   make run    install everything (apt + .venv) and run the whole stack with the Live emulator
#   make test   install test dependencies and run every test (what CI runs via .ci/run)
# System packages come from Debian (apt); Python packages go into .venv/ (pip, from pyproject.toml).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

# Debian packages the appliance needs at run time.
APT_RUN := janus coturn redis-server postgresql-15 espeak-ng sox libopus0 ca-certificates python3-venv
# ... and what the tests add: a browser, namespaces/firewall tools, packaging and a bootable Debian.
APT_TEST := $(APT_RUN) janus-doc redis-sentinel chromium iproute2 nftables haproxy keepalived curl \
	debootstrap systemd-container dh-virtualenv debhelper lintian devscripts python3-dev build-essential \
	dbus procps prometheus prometheus-alertmanager prometheus-redis-exporter

.PHONY: all run test test-unit test-fleet test-ops lint bench bench-smoke deb clean deps-run deps-test venv lock audit

all: venv

$(STAMPS):
	mkdir -p $(STAMPS)

# apt-get update only when a package is missing, so repeated runs are quick and offline-friendly.
call_apt_npm = (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps-run:
	$(call apt_install,$(APT_RUN))

deps-test:
	$(call apt_install,$(APT_TEST))
	@command -v npm >/dev/null || $(call_apt_npm)

$(STAMPS)/venv: pyproject.toml | $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ops]'
	# Silero VAD: only its ONNX model file is used; --no-deps keeps torch out (FACTS).
	$(PY) -m pip install -q --no-deps 'silero-vad==6.2.3'
	touch $@

venv: $(STAMPS)/venv

# Playwright drives Debian's chromium (never downloads a browser).
$(STAMPS)/node: tests/e2e/package.json | $(STAMPS)
	cd tests/e2e && npm install --no-audit --no-fund --silent
	touch $@

run: deps-run venv
	$(VENV)/bin/voice-appliance run

lint: venv
	$(VENV)/bin/ruff check appliance workers shm bench tests
	$(VENV)/bin/mypy

test: deps-test venv $(STAMPS)/node lint test-unit test-fleet test-ops bench-smoke

# CI must never hang (90-min limit): pytest-timeout bounds each test (pyproject), and `timeout` bounds
# each run. On expiry SIGINT makes pytest stop, print the running test's traceback and the summary;
# SIGKILL follows 60 s later if even that hangs. -rfEs lists failures, errors and skips (expect none).
# VA_TESTS_REQUIRE_ALL=1: a skipped test fails the run (tests/conftest.py).
PYTEST_RUN = VA_TESTS_REQUIRE_ALL=1 timeout -s INT -k 60

test-unit: venv
	$(PYTEST_RUN) 35m $(PY) -m pytest -q -rfEs --durations=15 -m "not ops and not fleet" tests

# The fleet on one machine (tests/harness/fleet.py): namespaces, HAProxy + keepalived, Redis + Sentinel.
test-fleet: venv deps-test
	$(PYTEST_RUN) 12m $(PY) -m pytest -q -rfEs --durations=15 -m fleet tests/fleet

test-ops: venv deps-test
	$(PYTEST_RUN) 45m $(PY) -m pytest -q -rfEs --durations=15 -m ops tests

bench: venv
	$(VENV)/bin/voice-appliance bench all --json

bench-smoke: venv
	timeout -s INT -k 30 10m $(VENV)/bin/voice-appliance bench smoke --json

deb: deps-test
	cd packaging && ./build-deb.sh

# The .deb installs exactly packaging/requirements.lock (hash-checked). Re-lock after changing
# pyproject.toml's dependencies; audit the lock against the PyPI/OSV advisories (needs their APIs).
# Locked with Debian's own /usr/bin/python3 (3.11.2), the .deb's interpreter: markers such as redis's
# async-timeout (python_full_version < 3.11.3) resolve as on the box.
lock:
	/usr/bin/python3 -m venv $(STAMPS)/lock-venv
	$(STAMPS)/lock-venv/bin/pip install -q 'pip-tools>=7.6,<8'
	$(STAMPS)/lock-venv/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --output-file packaging/requirements.lock pyproject.toml

audit: venv
	.venv/bin/pip-audit -r packaging/requirements.lock --require-hashes --no-deps --disable-pip \
		--progress-spinner off

clean:
	rm -rf $(VENV) $(STAMPS) build dist *.egg-info
