# falcon-mcore: patch set + overlay on a pinned NVIDIA Megatron-LM.  `make help` lists targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VPY := $(CURDIR)/$(VENV)/bin/python
BUILD := build/Megatron-LM
PATCHSET := $(PYTHON) scripts/patchset.py
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k bitnet -x"`.
PYTEST_ARGS ?=
# Upstream's lint tools (requirements/lint.txt) live in a virtualenv of their own.
LINT_VENV ?= .venv-lint
# check-patches runs upstream's lint rules: strict (fail on findings; the default, as in CI),
# report (print findings, do not fail) or off.
# (make has a built-in LINT = lint, and the environment may hold an unrelated LINT: only a
# LINT given on the command line or in this file counts.)
ifneq ($(filter default environment,$(origin LINT)),)
LINT := strict
endif

.PHONY: help setup upstream apply-patches export-patches check-patches pr-branch rebase-upstream check-base perf-report \
        dataset-helpers test test-tooling functional demo clean lint-venv format

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

setup: ## Create .venv (Python 3.12) with what the CPU tier needs; idempotent
	@$(PYTHON) scripts/setup_env.py --venv $(VENV)

upstream: ## Fetch the pinned upstream commit into the cache (MEGATRON_LM_GIT = URL or path)
	@$(PATCHSET) upstream

apply-patches: ## Create/refresh build/Megatron-LM = pin + patches/series + megatron_overlay/
	@$(PATCHSET) apply $(if $(DISCARD),--discard)

export-patches: ## Write commits of build/Megatron-LM back to patches/ and megatron_overlay/
	@$(PATCHSET) export $(if $(FORCE),--force)

check-patches: $(if $(filter off,$(LINT)),,lint-venv) ## Lint the series (+ upstream's black/isort/pylint/ruff/headers: LINT=report|strict|off), zero-fuzz apply, round trip
	@$(PATCHSET) check --lint "$(LINT)" --lint-venv "$(LINT_VENV)"

format: lint-venv ## Apply upstream's black + isort + copyright header to what the series adds/changes (rewrites the build tree, exports)
	@$(PATCHSET) format --lint-venv "$(LINT_VENV)"

lint-venv: $(LINT_VENV)/.falcon-mcore-lint ## Create .venv-lint with upstream's pinned lint tools (requirements/lint.txt)

$(LINT_VENV)/.falcon-mcore-lint: requirements/lint.txt | setup
	@echo "[lint-venv] installing requirements/lint.txt into $(LINT_VENV)"
	@rm -rf "$(LINT_VENV)" && $(VPY) -m venv "$(LINT_VENV)"
	@"$(LINT_VENV)/bin/python" -m pip install -q --disable-pip-version-check -r requirements/lint.txt
	@cp requirements/lint.txt "$@"

pr-branch: ## Branch + format-patch of one feature for upstream: make pr-branch FEATURE=<name> [BASE=<sha>] [VERIFY=1]
	@test -n "$(FEATURE)" || { echo "usage: make pr-branch FEATURE=<name> [BASE=<upstream sha>] [VERIFY=1|tests] (see patches/features.toml)" >&2; exit 2; }
	@$(PATCHSET) pr-branch --feature "$(FEATURE)" $(if $(BASE),--base "$(BASE)") \
	    $(if $(VERIFY),--verify --python "$(VPY)" $(if $(filter tests,$(VERIFY)),--run-tests))

rebase-upstream: ## Apply the series on upstream main (UPSTREAM_MAIN, or BASE=<sha>), resolve conflicts: [CONTINUE=1] [RESTART=1]
	@$(PATCHSET) rebase $(if $(or $(BASE),$(NEW)),--base "$(or $(BASE),$(NEW))") \
	    $(if $(CONTINUE),--continue) $(if $(RESTART),--restart)

check-base: ## Check that the series (with patches/bases/ resolutions) and overlay apply on upstream main (UPSTREAM_MAIN, or BASE=<sha>)
	@$(PATCHSET) check-base $(if $(BASE),--base "$(BASE)")

# Megatron's dataset index helpers (C++); its own Makefile would use whatever python3 is on PATH.
dataset-helpers: setup apply-patches
	@$(MAKE) -s -C $(BUILD)/megatron/core/datasets \
	    CPPFLAGS="$$($(VPY) -m pybind11 --includes)" \
	    LIBEXT="$$($(VPY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"

test: setup lint-venv apply-patches dataset-helpers ## Run every CPU test: tooling, unit, HF parity, functional cases
	@$(VPY) scripts/run_tests.py $(PYTEST_ARGS)

test-tooling: lint-venv ## Only the patch-set tooling tests
	@$(VPY) -m pytest -q tests/tooling $(PYTEST_ARGS)

functional: setup apply-patches dataset-helpers ## Run one functional case: make functional CASE=<model>/<case> PLATFORM=cpu|h100 [RECORD=1]
	@test -n "$(CASE)" || { echo "usage: make functional CASE=<model>/<case> [PLATFORM=cpu] [RECORD=1]" >&2; exit 2; }
	@$(VPY) scripts/functional.py --case "$(CASE)" --platform "$(or $(PLATFORM),cpu)" $(if $(RECORD),--record)

perf-report: ## Regenerate README's performance table and results/falcon_h1_throughput.svg from the results files
	@python3 scripts/perf_report.py

demo: setup apply-patches dataset-helpers ## Train a tiny model for ~50 steps on whatever device exists
	@bash scripts/demo.sh

clean: ## Remove build/ (refuses if build/Megatron-LM holds unexported work)
	@$(PATCHSET) guard && rm -rf build
