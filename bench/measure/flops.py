"""Floating-point operations counted by torch's FlopCounterMode, with the attention kernel of
CPUs counted too: scaled_dot_product_attention dispatches there to
`_scaled_dot_product_flash_attention_for_cpu`, which torch's counter has no formula for, so
attention's two matrix products (Q Kᵀ and the weighted sum of V, 4 · tokens_q · tokens_k · width
per head in the forward, twice that and more in the backward) would count as nothing on a CPU
and under fake tensors, where the planner counts. The formulas are torch's own for its GPU
attention kernels."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode (no display) that counts the CPU attention kernel as torch counts its GPU ones."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
