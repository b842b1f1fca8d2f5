# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.

"""A Falcon-H1 Megatron checkpoint read as HF tensors, one layer at a time.

:class:`FalconH1Checkpoint` is the one reader of Falcon-H1 Megatron checkpoints: the dense
converter (``falcon_h1_conversion.py megatron-to-hf``) and the BitNet exporter
(``bitnet_hf_export.py``) both read through it. It takes either format that
:func:`conversion_io.open_megatron_checkpoint` opens (legacy ``torch`` at any TP / PP, or
``torch_dist``), checks that the checkpoint holds exactly the tensors its args imply, and gives
the HF tensors of the embedding, of each layer and of the final norm and output layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from conversion_io import ConversionError, LegacyReader, TorchDistReader, logger, merge_replicated
from falcon_h1_config import HF_CONFIG_ARG, hf_config_from_settings, settings_from_megatron_args
from falcon_h1_layouts import (
    MG_EMBED,
    MG_FINAL_NORM,
    MG_OUTPUT,
    megatron_layer_to_hf,
    megatron_vocab_to_hf,
    mg_layer_keys,
    torch_dist_keys,
    torch_dist_layer_keys,
    torch_dist_layer_to_hf,
)
from falcon_h1_parallel import check_tensor_parallel, stage_offsets

Tensor = torch.Tensor
_log = logger("falcon-h1-convert")
# Norms every TP rank of a layer holds whole (Megatron names under decoder.layers.{i}.).
_REPLICATED_NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight")


def base_hf_config(args, hf_config: Optional[str]) -> Optional[dict]:
    """The HF config.json the model came from: ``--hf-config``, else the one hf-to-megatron
    recorded in the args, else the recorded tokenizer directory's (a Megatron run resaves only
    the args it knows, so a trained checkpoint keeps the tokenizer path but not the config)."""
    candidates = []
    if hf_config:
        path = Path(hf_config)
        candidates.append(path / "config.json" if path.is_dir() else path)
    recorded = getattr(args, HF_CONFIG_ARG, None)
    if recorded and not hf_config:
        return dict(recorded)
    tok = getattr(args, "tokenizer_model", None)
    if tok and not hf_config:
        candidates.append(Path(tok) / "config.json")
    for path in candidates:
        if path.is_file():
            with open(path) as f:
                config = json.load(f)
            if config.get("model_type") == "falcon_h1":
                _log(f"non-model config fields (token ids, ...) from {path}")
                return config
        elif hf_config:
            raise ConversionError(f"--hf-config {hf_config}: no config.json there")
    return None


class FalconH1Checkpoint:
    """The HF tensors of the Falcon-H1 model a Megatron checkpoint holds.

    Args:
        reader: the checkpoint (:func:`conversion_io.open_megatron_checkpoint`).
        vocab: the unpadded vocabulary; default: the source HF config's, else the args'.
        hf_config: ``--hf-config`` (see :func:`base_hf_config`).
        extra_layer_keys: tensors of each layer beyond the Falcon-H1 ones (Megatron names under
            ``decoder.layers.{i}.``), each mapped to True when every TP rank holds it whole,
            False when it is split along dim 0; :meth:`layer` returns them merged.

    Raises :class:`ConversionError` when the args do not describe a Falcon-H1 model or the
    checkpoint holds other tensors than they imply.
    """

    def __init__(
        self,
        reader: Union[LegacyReader, TorchDistReader],
        vocab: Optional[int] = None,
        hf_config: Optional[str] = None,
        extra_layer_keys: Optional[Mapping[str, bool]] = None,
    ):
        self.reader = reader
        self.base_config = base_hf_config(reader.args, hf_config)
        vocab = vocab or (self.base_config or {}).get("vocab_size")
        self.settings, self.counts = settings_from_megatron_args(reader.args, vocab)
        self.dims = self.settings.dims
        self.extra = dict(extra_layer_keys or {})
        self.offsets = stage_offsets(self.counts)
        self.padded = self._check_dist() if reader.is_dist else self._check_legacy()
        if self.padded < self.dims.vocab:
            raise ConversionError(f"padded vocabulary {self.padded} < vocab_size {self.dims.vocab}")

    def _check_dist(self) -> int:
        tensors = self.reader.tensors
        if MG_EMBED not in tensors:
            raise ConversionError(f"{self.reader.ckpt_dir}: missing tensor {MG_EMBED}")
        padded = int(tensors[MG_EMBED].size[0])
        expected: Dict[str, Optional[tuple]] = dict(torch_dist_keys(self.dims, padded))
        for i in range(self.dims.num_layers):
            expected.update({f"decoder.layers.{i}.{k}": None for k in self.extra})
        self.reader.check(expected)
        return padded

    def _check_legacy(self) -> int:
        reader, dims = self.reader, self.dims
        check_tensor_parallel(dims, reader.tp)
        layer_keys = mg_layer_keys(dims) + list(self.extra)

        def expected(stage: int) -> List[str]:
            names = [MG_EMBED] if stage == 0 else []
            for local in range(self.counts[stage]):
                names += [f"decoder.layers.{local}.{k}" for k in layer_keys]
            if stage == reader.pp - 1:
                names += [MG_FINAL_NORM, MG_OUTPUT]
            return names

        reader.check(expected)
        return int(sum(t.shape[0] for t in reader.shards(MG_EMBED, 0)))

    def config(self) -> dict:
        """The HF config.json of the model (non-model keys from the source config, if known)."""
        return hf_config_from_settings(self.settings, self.base_config)

    def embedding(self) -> Tensor:
        """``model.embed_tokens.weight`` (the padding rows dropped)."""
        if self.reader.is_dist:
            full = self.reader.read([MG_EMBED])[MG_EMBED]
        else:
            full = torch.cat(self.reader.shards(MG_EMBED, 0), dim=0)
        return megatron_vocab_to_hf([full], self.dims.vocab)

    def tail(self) -> Tuple[Tensor, Tensor]:
        """``model.final_layernorm.weight`` and ``lm_head.weight``."""
        if self.reader.is_dist:
            t = self.reader.read([MG_FINAL_NORM, MG_OUTPUT])
            norm, head = t[MG_FINAL_NORM], [t[MG_OUTPUT]]
        else:
            last = self.reader.pp - 1
            norm = merge_replicated(MG_FINAL_NORM, self.reader.shards(MG_FINAL_NORM, last))
            head = self.reader.shards(MG_OUTPUT, last)
        return norm, megatron_vocab_to_hf(head, self.dims.vocab)

    def layer(self, i: int) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Global layer ``i``: its HF tensors (names under ``model.layers.{i}.``) and its
        ``extra_layer_keys`` tensors, TP shards merged (Megatron names)."""
        d = self.dims
        if self.reader.is_dist:
            p = f"decoder.layers.{i}."
            keys = list(torch_dist_layer_keys(d, i)) + [p + k for k in self.extra]
            tensors = self.reader.read(keys)
            return (torch_dist_layer_to_hf(tensors, d, i), {k: tensors[p + k] for k in self.extra})
        stage = max(s for s in range(len(self.counts)) if self.offsets[s] <= i)
        p = f"decoder.layers.{i - self.offsets[stage]}."
        shards = [
            {k: self.reader.models[(r, stage)][p + k] for k in mg_layer_keys(d)}
            for r in range(self.reader.tp)
        ]
        for name in _REPLICATED_NORMS:
            merge_replicated(name, [s[name] for s in shards])
        extra = {}
        for k, replicated in self.extra.items():
            parts = self.reader.shards(p + k, stage)
            extra[k] = merge_replicated(p + k, parts) if replicated else torch.cat(parts, dim=0)
        return megatron_layer_to_hf(shards, d), extra
