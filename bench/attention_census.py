"""Which kernel each attention call of a run uses.

PyTorch picks the kernel of scaled_dot_product_attention per call; torch._fused_sdp_choice asks
the same question without running it, under the backends enabled at that moment. The pipeline
restricts its image stages to the fused kernels on a GPU (show1.attention), so there a math
fallback raises; the census says how many calls each kernel took, per stage, so a report can
show that the restriction held everywhere and which fused kernel served the calls.
"""

from collections import Counter, defaultdict

import torch
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

BACKEND_NAMES = {int(b): b.name.lower() for b in (
    SDPBackend.ERROR, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION, SDPBackend.OVERRIDEABLE,
)}
MATH = BACKEND_NAMES[int(SDPBackend.MATH)]


def chosen_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The kernel scaled_dot_product_attention will run for these arguments."""
    choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return BACKEND_NAMES.get(int(choice), f"backend {int(choice)}")


class AttentionCensus(TorchFunctionMode):
    """Counts attention calls by kernel while active; `end_stage` files the counts under a stage."""

    def __init__(self):
        super().__init__()
        self.by_stage = defaultdict(Counter)
        self._pending = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self._pending[chosen_backend(*args, **kwargs)] += 1
        return func(*args, **kwargs)

    def end_stage(self, stage, seconds=None):
        self.by_stage[stage] += self._pending
        self._pending = Counter()

    def math_calls(self, stages) -> int:
        return sum(self.by_stage[stage][MATH] for stage in stages)
