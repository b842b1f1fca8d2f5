#!/usr/bin/env bash
# Prepare what a GPU machine needs besides the repo checkout, in the ignored folder .carry/:
#   .carry/megatron.tar.xz  the patched tree's files (git archive of build/Megatron-LM HEAD, its
#                           unit tests for the GPU job's `unit` step, + the compiled dataset
#                           helpers), unpacked there by scripts/gpu/setup_env.sh
#   .carry/wheels           mamba_ssm / causal_conv1d wheels (from ../shared/wheels or $WHEELS_DIR)
#                           and liger-kernel / torchao (downloaded here from PyPI once)
#   .carry/te               the Transformer Engine kit (../shared/te or $TE_DIR), if present
#   .carry/provenance.json  the commit, dirty flag and `git describe` of this checkout, and a
#                           fingerprint of its files: the GPU machine gets the tree without .git;
#                           scripts/lib/provenance.py reads this there (and marks results dirty
#                           when the files changed after this ran). Run this after every change.
# TREE_REV: the build tree's revision to carry instead of HEAD (e.g. a PR branch of
# `make pr-branch`, pr/<feature>, to run that branch's tests on a GPU with the `unit` step).
# Everything must stay under the device tool's 64 MiB per call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
make -s apply-patches
rm -rf .carry/Megatron-LM .carry/megatron.tar.xz && mkdir -p .carry/wheels
{
    git -C build/Megatron-LM archive --format=tar "${TREE_REV:-HEAD}" megatron tools pretrain_gpt.py \
        pretrain_hybrid.py pretrain_mamba.py gpt_builders.py hybrid_builders.py mamba_builders.py \
        model_provider.py tests/__init__.py tests/unit_tests tests/test_utils
} | xz -T0 -6 > .carry/megatron.tar.xz
# Which tree that is (the unit step's report records it: the checkout's commit alone does not say).
printf '%s %s\n' "${TREE_REV:-HEAD}" "$(git -C build/Megatron-LM rev-parse "${TREE_REV:-HEAD}")" \
    > .carry/tree.txt
helpers=$(ls build/Megatron-LM/megatron/core/datasets/helpers_cpp*.so 2>/dev/null | head -1 || true)
if [ -n "$helpers" ]; then cp "$helpers" .carry/; fi
wheels=${WHEELS_DIR:-../shared/wheels}
if [ -d "$wheels" ]; then cp "$wheels"/*.whl .carry/wheels/; fi
LIGER=liger_kernel-0.8.5-py3-none-any.whl
if [ ! -f ".carry/wheels/$LIGER" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/wheels liger-kernel==0.8.5
fi
# torchao: the BitNet training peer of scripts/bench_bitnet.py (its case "torchao").
if ! ls .carry/wheels/torchao-0.18.0-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d .carry/wheels torchao==0.18.0
fi
te=${TE_DIR:-../shared/te}
if [ -d "$te" ]; then rm -rf .carry/te && mkdir -p .carry/te && cp "$te"/te_site.tar.xz "$te"/*.whl "$te"/te_env.sh .carry/te/; fi
python3 scripts/lib/provenance.py --write-carry .carry/provenance.json
du -sh .carry
