# lazyfs developer entry points.
#
#   make demo    set up everything, start a local registry, convert a sample image, mount it lazily
#   make test    set up everything and run the test suite
#   make lint    ruff check, ruff format --check, mypy
#   make bench   run the micro-benchmarks (python -m lazyfs.bench.micro)
#   make clean   remove caches and build artefacts (make distclean also removes .venv)
#
# Every target is idempotent: a second `make setup` checks the Debian packages with
# dpkg and compares pyproject.toml with a stamp file, and does nothing else.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.lazyfs-installed

APT_PACKAGES := fuse3 libfuse3-dev pkg-config docker-registry skopeo umoci fsverity zstd \
                mmdebstrap iproute2 procps psmisc busybox-static podman runc

# Root runs apt-get directly; anyone else goes through sudo. Override with e.g.
# `make setup SUDO="sudo -n"` (or SUDO in the environment) for a non-interactive sudo.
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Nothing in here may ever wait for a keyboard.
export DEBIAN_FRONTEND := noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help setup system-deps demo test lint bench clean distclean

help:
	@sed -n 's/^#   make /make /p' $(firstword $(MAKEFILE_LIST))

# The byte-compile runs every time (it only rewrites stale files): sources edited after the
# install would otherwise be compiled at every start where PYTHONDONTWRITEBYTECODE is set.
setup: system-deps $(STAMP)
	@$(VENV_PY) -m compileall -q lazyfs >/dev/null

# Installs the Debian packages that are missing, and only those. `apt-get update` runs at
# most once, and only when something is missing (skipped if the caller already ran it and
# exported LAZYFS_APT_UPDATED=1).
system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:$$missing"; \
	  if [ "$${LAZYFS_APT_UPDATED:-0}" != 1 ]; then \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  fi; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	    $$missing </dev/null; \
	fi

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml is newer than the stamp (or the venv is new).
# system-deps is order-only: pyfuse3 compiles against libfuse3-dev, so the packages must be
# there first, but a phony target must not force a reinstall on every run.
# The editable install is a path entry (compat mode), not setuptools' import hook, which costs
# every start of the interpreter ~25 ms; lazyfs's modules are byte-compiled here, as a normal
# install does (by `setup`, below), so that a client (`lazyfs mount`) never compiles them, even where
# PYTHONDONTWRITEBYTECODE is set.
$(STAMP): pyproject.toml | system-deps $(VENV_PY)
	$(VENV_PY) -m pip install -q -e '.[dev,bench]' --config-settings editable_mode=compat
	touch $@

demo: setup
	$(VENV)/bin/lazyfs demo

# pytest's exit code 5 means no test was collected: say so loudly, and fail.
test: setup
	@echo "+ $(VENV_PY) -m pytest -q $(PYTEST_ARGS)"; \
	rc=0; $(VENV_PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc = 5 ]; then echo "test: FAIL: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# Runs all three checks and fails if any of them failed.
lint: setup
	@rc=0; \
	echo "+ ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "+ ruff format --check ."; $(VENV)/bin/ruff format --check . || rc=1; \
	echo "+ mypy"; $(VENV)/bin/mypy || rc=1; \
	exit $$rc

bench: setup
	@echo "+ $(VENV_PY) -m lazyfs.bench.micro $(BENCH_ARGS)"; $(VENV_PY) -m lazyfs.bench.micro $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
