"""Model FLOPs as torch's FlopCounterMode counts them, with attention counted on every device.

torch registers FLOP formulas for the CUDA attention kernels only: on CPU, SDPA dispatches to
`_scaled_dot_product_flash_attention_for_cpu`, which the counter skips, so CPU counts would leave
out attention (34 of 343 GFLOP for a DDT-S/2 training step at 256 tokens) while GPU counts include it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of fn: `total` (matrix products and attention) and the `attention` part."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    return {"total": counter.get_total_flops(), "attention": attention}


def model_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (matrix products and attention)."""
    return count_flops(fn)["total"]
