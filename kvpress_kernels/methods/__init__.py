"""Compression methods: policies over the ops (DESIGN.md §6). ``keep_ratio`` is the fraction KEPT.

See :mod:`kvpress_kernels.methods.base` for the interface the integrations call, and docs/METHODS.md
for every method's rules and the choices the papers leave open."""

from .base import (CompressionMethod, DecodeInputs, Eviction, GenerationInfo, PrefillInputs,  # noqa: F401
                   budget_tokens)
from .adakv import AdaKV
from .chunkkv import ChunkKV
from .h2o import H2O, TOVA
from .kvzip import KVzip
from .shotkv import ShotKV
from .simple import KNorm, ScorerTopK, StreamingLLM
from .snapkv import PyramidKV, SnapKV

__all__ = ["CompressionMethod", "GenerationInfo", "PrefillInputs", "DecodeInputs", "Eviction", "budget_tokens",
           "ShotKV", "SnapKV", "PyramidKV", "ChunkKV", "StreamingLLM", "H2O", "TOVA", "KNorm", "ScorerTopK", "AdaKV",
           "KVzip"]
