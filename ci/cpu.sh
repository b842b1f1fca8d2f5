#!/usr/bin/env bash
# The CPU job: what every push runs (GitHub Actions `cpu` job and .ci/run).
# Needs: git, make, Python 3.12 (python3.12 on PATH, $PYTHON312, or pyenv), network access to
# PyPI the first time, and upstream Megatron-LM reachable once (MEGATRON_LM_GIT or GitHub);
# later runs reuse ~/.cache/falcon-mcore/Megatron-LM.git and the venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
make setup
make upstream
make apply-patches
make check-patches          # LINT=strict (Makefile default): upstream-lint findings fail the job
make test                  # the README's test command
echo "[ci] CPU job passed in $((SECONDS - start)) s"
