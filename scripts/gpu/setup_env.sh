# Source on the GPU machine from the repo root, after scripts/gpu/prepare_carry.sh ran here:
#   source scripts/gpu/setup_env.sh [--te]
# Unpacks the patched tree to .carry/Megatron-LM (exported as $MEGATRON), installs the carried
# wheels into /tmp/site, makes mamba_ssm importable (its GPU wheel lacks the Mamba-1 extension
# `selective_scan_cuda`: a placeholder module that raises on use stands in), and with --te
# unpacks the Transformer Engine kit. Idempotent and quick on a machine that already has them.
_site=/tmp/site
mkdir -p "$_site"
if [ -f .carry/megatron.tar.xz ] && [ ! -f .carry/Megatron-LM/.unpacked ]; then
    rm -rf .carry/Megatron-LM && mkdir -p .carry/Megatron-LM
    tar -xJf .carry/megatron.tar.xz -C .carry/Megatron-LM
    cp .carry/helpers_cpp*.so .carry/Megatron-LM/megatron/core/datasets/ 2>/dev/null || true
    touch .carry/Megatron-LM/.unpacked
fi
if [ -d .carry/Megatron-LM/megatron ]; then MEGATRON=$PWD/.carry/Megatron-LM; else MEGATRON=$PWD/build/Megatron-LM; fi
export MEGATRON
if ls .carry/wheels/*.whl >/dev/null 2>&1 && [ ! -f "$_site/.wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$_site" .carry/wheels/*.whl
    cat > "$_site/selective_scan_cuda.py" <<'PY'
"""Placeholder: this mamba_ssm build has no Mamba-1 CUDA extension (Mamba-2 does not need it)."""


def __getattr__(name):
    raise ImportError(f"selective_scan_cuda.{name}: the Mamba-1 CUDA extension is not installed")
PY
    touch "$_site/.wheels"
fi
export PYTHONPATH=$_site${PYTHONPATH:+:$PYTHONPATH}
# Transformer Engine goes to a folder of its own, on the path only with --te: a call without it on
# a machine still warm from a --te call must not import TE (it did when both shared /tmp/site, and
# a "no TE" benchmark then ran TE's fused RoPE).
_te_site=/tmp/site-te
if [ "${1:-}" = "--te" ] && [ -f .carry/te/te_env.sh ]; then
    if [ -d "$_te_site/transformer_engine" ]; then
        _nv=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
        export CUDNN_PATH=$_nv/cudnn NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
        export PYTHONPATH=$_te_site:$PYTHONPATH
        unset _nv
    else
        TE_SITE=$_te_site source .carry/te/te_env.sh
    fi
fi
unset _te_site
export USE_HUB_KERNELS=NO HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset _site
