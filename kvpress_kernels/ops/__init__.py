"""The ops of DESIGN.md §5. Each module holds the PyTorch reference ``<op>_ref``, the Triton
kernel(s), the ``torch.library`` registration (namespace ``kvpress_kernels``) and the public,
validating function that dispatches between backends. Importing this package registers every
``torch.ops.kvpress_kernels.*`` op."""

from .append import append_, append_ref
from .block_compaction import block_attention_mass, block_compact_, block_compact_ref, block_gather_, block_gather_ref
from .compaction import compact_, compact_ref, compaction_plan_ref
from .decode_attention import default_num_splits, paged_decode_attention, paged_decode_attention_ref
from .head_budget import select_head_budget, select_head_budget_ref
from .scoring import (attention_lse, attention_lse_ref, attention_mass, attention_mass_paged,
                      attention_mass_paged_ref, attention_mass_ref, pool_scores, token_norm)
from .segments import segment_reduce, segment_reduce_ref, segments_to_token_mask
from .selection import select_segments, select_segments_ref, select_topk, select_topk_ref

__all__ = [
    "append_", "append_ref",
    "block_compact_", "block_compact_ref", "block_gather_", "block_gather_ref", "block_attention_mass",
    "compact_", "compact_ref", "compaction_plan_ref",
    "paged_decode_attention", "paged_decode_attention_ref", "default_num_splits",
    "attention_lse", "attention_lse_ref", "attention_mass", "attention_mass_ref",
    "attention_mass_paged", "attention_mass_paged_ref", "pool_scores", "token_norm",
    "segment_reduce", "segment_reduce_ref", "segments_to_token_mask",
    "select_topk", "select_topk_ref", "select_segments", "select_segments_ref",
    "select_head_budget", "select_head_budget_ref",
]
