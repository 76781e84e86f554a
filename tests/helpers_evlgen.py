"""Tiny EVLGen pieces for tests: local tiny OPT / LLaMA directories (built once per test session
with the real ``save_pretrained`` / ``from_pretrained`` path) and tiny model configs."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.config import load_config
from pipeline.models.evlgen import EvlgenConfig
from data_prep.tiny_llm import build_tiny_llm

TINY_OPT = dict(model_type="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2,
                word_embed_proj_dim=64, max_position_embeddings=128)
TINY_LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)


def tiny_llm(base: Path, kind: str, steps: int = 0) -> str:
    """A local tiny LLM directory under ``base`` (built on first call, reused after):
    ``kind`` opt | llama, ``steps`` of LM pre-training (0 = random weights)."""
    out = Path(base) / f"{kind}_{steps}"
    build_tiny_llm(out, TINY_OPT if kind == "opt" else TINY_LLAMA, steps=steps)
    return str(out)


def tiny_config(llm_dir: str, **model) -> EvlgenConfig:
    """``tiny_evlgen_opt.yaml``'s model section with the LLM at ``llm_dir`` (fields overridable)."""
    cfg = load_config("tiny_evlgen_opt").model
    cfg = replace(cfg, llm=replace(cfg.llm, pretrained=llm_dir, build_if_missing=False))
    return replace(cfg, **model)
