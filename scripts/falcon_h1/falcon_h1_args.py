#!/usr/bin/env python3
"""Print the Megatron model flags of a Falcon-H1 size (one flag or value per line).

Shapes come from DESIGN.md section 3. Only the 0.5B row (shapes and the 14 multipliers) was
verified against a release config; for every other size the multipliers, and the cells marked
unknown, must come from that release's ``config.json``: pass ``--hf-config PATH`` and every
architecture field and multiplier is read from it instead (recommended for all sizes).

    python scripts/falcon_h1/falcon_h1_args.py --preset 0.5b
    python scripts/falcon_h1/falcon_h1_args.py --hf-config Falcon-H1-7B-Base/config.json
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


def from_preset(name: str) -> list[str]:
    layers, hidden, heads, kv, hd, mh, md, ds, g, ffn, vocab, rms = PRESETS[name]
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


def from_hf_config(path: Path) -> list[str]:
    """Flags from a release config.json, via the checkpoint converter's config mapping (one
    implementation: it validates the config and refuses what Megatron cannot express)."""
    table = mapping()
    try:
        settings = table.parse_hf_config(json.loads(path.read_text()))
        flags = table.megatron_model_flags(settings, [settings.dims.num_layers])
    except (table.ConversionError, KeyError, ValueError) as exc:
        sys.exit(f"error: {path}: {exc}")
    return flags + ["--vocab-size", str(settings.dims.vocab)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(PRESETS))
    group.add_argument("--hf-config", type=Path)
    args = parser.parse_args()
    flags = from_preset(args.preset) if args.preset else from_hf_config(args.hf_config)
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
