"""Fused attention only, on the GPU.

With Show-1's head arithmetic the sr2 UNet's attention heads are 5, 10 and 20 wide. PyTorch's
math fallback for scaled_dot_product_attention materialises the attention matrix: about 231 GiB for
one sr2 forward, against 3.3 GiB with the flash kernel. A silent fallback would be an out-of-memory
error deep inside the last stage; restricting the backends turns it into an immediate, explicit
error ("No available kernel") at the first attention call instead.
"""

from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def fused_attention(device):
    """A context in which every attention call on a CUDA `device` runs a fused kernel or raises.
    On the CPU (tests, tiny networks) nothing changes."""
    if torch.device(device).type == "cuda":
        return sdpa_kernel(FUSED_BACKENDS)
    return nullcontext()
