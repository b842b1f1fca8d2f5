# Sourced by the scripts/*.sh wrappers: run a Python tool of the patched tree.
#   run_build_tool tools/checkpoint/<tool>.py [args...]
# The tree is build/Megatron-LM (made by `make apply-patches`; $FALCON_MCORE_BUILD overrides it)
# and goes first on PYTHONPATH; the interpreter is $PYTHON, else the repo's .venv, else python3.
run_build_tool() {
    local root build tool python
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    build="${FALCON_MCORE_BUILD:-$root/build/Megatron-LM}"
    tool="$build/$1"
    shift
    if [ ! -f "$tool" ]; then
        echo "error: $tool not found: run \`make apply-patches\` (or set FALCON_MCORE_BUILD)" >&2
        exit 2
    fi
    python="${PYTHON:-}"
    if [ -z "$python" ]; then
        python=python3
        [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
    fi
    export PYTHONPATH="$build${PYTHONPATH:+:$PYTHONPATH}"
    exec "$python" "$tool" "$@"
}
