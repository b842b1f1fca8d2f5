#!/usr/bin/env python3
"""Print the Megatron model flags of a Falcon-H1 size (one flag or value per line).

Shapes come from DESIGN.md section 3. Only the 0.5B row (shapes and the 14 multipliers) was
verified against a release config; for every other size the multipliers, and the cells marked
unknown, must come from that release's ``config.json``: pass ``--hf-config PATH`` and every
architecture field and multiplier is read from it instead (recommended for all sizes).

    python scripts/falcon_h1/falcon_h1_args.py --preset 0.5b
    python scripts/falcon_h1/falcon_h1_args.py --hf-config Falcon-H1-7B-Base/config.json

``--tensor-model-parallel-size`` / ``--context-parallel-size`` (not printed: the launchers pass
them to Megatron) check that the shapes split at those sizes; any size that divides the
attention and Mamba heads works, including more TP ranks than Mamba groups or KV heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from project_paths import use  # noqa: E402

# size: layers, hidden, heads, kv heads, head_dim, mamba heads, mamba head_dim, d_state,
#       groups, ffn, vocab, mamba_rms_norm
PRESETS = {
    "0.5b": (36, 1024, 8, 2, 64, 24, 64, 128, 1, 2048, 32784, False),
    "1.5b": (24, 2048, 8, 2, 128, 48, 64, 256, 1, 4608, 65537, True),
    "1.5b-deep": (66, 1280, 6, 2, 128, 24, 64, 256, 1, None, None, True),
    "3b": (32, 2560, 10, 2, 128, 32, 128, 256, 1, 6144, 65536, True),
    "7b": (44, 3072, 12, 2, 128, 24, 128, 256, 1, 12288, 130048, True),
    "34b": (72, 5120, 20, 4, 128, 32, 128, 256, 2, None, None, True),
}
VERIFIED = {"0.5b"}
MULTIPLIERS_0_5B = {
    "embedding_multiplier": 5.656854249492381,
    "lm_head_multiplier": 0.0390625,
    "key_multiplier": 0.390625,
    "attention_in_multiplier": 1.0,
    "attention_out_multiplier": 0.9375,
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.23570226,
    "mlp_multipliers": [0.88388348, 0.5859375],
    "ssm_multipliers": [0.35355339, 0.25, 0.35355339, 0.5, 0.35355339],
}
def common_flags(rope_theta: float, eps: float, chunk: int, conv: int) -> list[str]:
    return [
        "--normalization", "RMSNorm", "--norm-epsilon", repr(eps), "--swiglu",
        "--disable-bias-linear", "--position-embedding-type", "rope",
        "--rotary-base", str(int(rope_theta)), "--untie-embeddings-and-output-weights",
        "--mamba-chunk-size", str(chunk), "--mamba-conv-kernel", str(conv),
    ]


def mapping():
    """The checkpoint converter's config mapping (imports Megatron's multiplier table: the
    patched tree is taken from $MEGATRON, default build/Megatron-LM)."""
    megatron = Path(os.environ.get("MEGATRON", ROOT / "build" / "Megatron-LM"))
    if not (megatron / "megatron" / "core").is_dir():
        sys.exit(f"error: {megatron} is not a patched Megatron tree (run `make apply-patches`)")
    use("overlay_checkpoint_tools", "megatron", megatron=megatron)
    with warnings.catch_warnings():  # Megatron's import-time notices (no TE / apex, ...)
        warnings.simplefilter("ignore")
        import falcon_h1_config

    return falcon_h1_config


def multiplier_flags(m: dict) -> list[str]:
    table = mapping()
    flags = []
    for name in table.SCALAR_MULTIPLIERS:
        flags += ["--" + name.replace("_", "-"), repr(float(m[name]))]
    for name in table.LIST_MULTIPLIERS:
        flags += ["--" + name.replace("_", "-"), *(repr(float(v)) for v in m[name])]
    return flags


def shape_flags(layers, hidden, heads, kv, head_dim, m_heads, m_dim, d_state, groups, ffn,
                rms_norm) -> list[str]:
    return [
        "--hybrid-layer-pattern", "P" * layers, "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(ffn), "--num-attention-heads", str(heads),
        "--group-query-attention", "--num-query-groups", str(kv), "--kv-channels", str(head_dim),
        "--mamba-num-heads", str(m_heads), "--mamba-head-dim", str(m_dim),
        "--mamba-state-dim", str(d_state), "--mamba-num-groups", str(groups),
    ] + ([] if rms_norm else ["--no-mamba-rms-norm"])


def parallel_problems(heads, kv, m_heads, groups, d_state, ffn, tp: int, cp: int) -> list[str]:
    """Why a Falcon-H1 shape cannot run at tensor-parallel size ``tp`` and context-parallel
    size ``cp`` (Megatron's own rules, checked before a launch); empty when it can."""
    problems = []
    if tp < 1 or cp < 1:
        return [f"parallel sizes must be >= 1, got TP {tp}, CP {cp}"]
    if heads % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} must divide the {heads} attention heads "
            "(--num-attention-heads)"
        )
    if kv % tp and tp % kv:
        problems.append(
            f"--tensor-model-parallel-size {tp} must divide or be a multiple of the {kv} KV heads "
            "(--num-query-groups)"
        )
    if ffn is not None and ffn % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} must divide --ffn-hidden-size {ffn}"
        )
    mapping()  # puts the patched tree on sys.path
    from megatron.core.ssm.mamba_group_sharing import check_mamba_parallel_sizes

    mamba = check_mamba_parallel_sizes(m_heads, groups, d_state, tp, cp)
    if mamba is not None:
        problems.append(mamba)
    return problems


def check_parallel(shape: tuple, tp: int, cp: int) -> None:
    """Exit with the problems of ``shape`` (heads, kv, mamba heads, groups, d_state, ffn) at
    TP ``tp`` and CP ``cp``."""
    problems = parallel_problems(*shape, tp, cp)
    if problems:
        sys.exit("error: " + "; ".join(problems))


def from_preset(name: str, tp: int = 1, cp: int = 1) -> list[str]:
    layers, hidden, heads, kv, hd, mh, md, ds, g, ffn, vocab, rms = PRESETS[name]
    check_parallel((heads, kv, mh, g, ds, ffn), tp, cp)
    if name not in VERIFIED:
        sys.exit(
            f"error: preset {name}: the multipliers (and {'ffn/vocab ' if ffn is None else ''}"
            "cells marked unknown) of this size are not verified here; pass the release's "
            "config.json with --hf-config"
        )
    return (
        shape_flags(layers, hidden, heads, kv, hd, mh, md, ds, g, ffn, rms)
        + common_flags(1e11, 1e-5, 128, 4)
        + multiplier_flags(MULTIPLIERS_0_5B)
        + ["--vocab-size", str(vocab)]
    )


def from_hf_config(path: Path, tp: int = 1, cp: int = 1) -> list[str]:
    """Flags from a release config.json, via the checkpoint converter's config mapping (one
    implementation: it validates the config and refuses what Megatron cannot express)."""
    table = mapping()
    try:
        settings = table.parse_hf_config(json.loads(path.read_text()))
        flags = table.megatron_model_flags(settings, [settings.dims.num_layers])
    except (table.ConversionError, KeyError, ValueError) as exc:
        sys.exit(f"error: {path}: {exc}")
    d = settings.dims
    check_parallel((d.heads, d.kv_heads, d.mamba_heads, d.mamba_groups, d.d_state, d.ffn), tp, cp)
    return flags + ["--vocab-size", str(d.vocab)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(PRESETS))
    group.add_argument("--hf-config", type=Path)
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1,
                        help="check that the model splits over this many TP ranks")
    parser.add_argument("--context-parallel-size", "--cp", type=int, default=1,
                        help="check that the model splits over this many CP ranks")
    args = parser.parse_args()
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if args.preset:
        flags = from_preset(args.preset, tp, cp)
    else:
        flags = from_hf_config(args.hf_config, tp, cp)
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
