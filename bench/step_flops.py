"""GFLOPs of one denoising step of each stage at the published sizes: the weights of the
prediction's progress bar (show1.progress.STEP_GFLOPS).

    .venv/bin/python -m bench.step_flops      # prints the table to paste into show1/progress.py

Each stage's UNet is built at its published size and called once on fake tensors (nothing is
allocated), at the shapes the stage code uses (bench.fake_memory.STAGE_CALLS), while
torch.utils.flop_counter counts the floating-point operations of its matrix products,
convolutions and attention. On the CPU, fake attention dispatches to the CPU flash kernel,
which the counter has no formula for: it is counted with torch's formula for attention, so that
what is counted is what a GPU's fused kernels compute.
"""

import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from show1.progress import STEP_GFLOPS

from .fake_memory import STAGE_CALLS, published_networks_on_meta


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOPs of one attention call (softmax(QK^T)V), from its input shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}


def unet_call_flops(unet, calls) -> int:
    """FLOPs of the calls among `calls` that run `unet` (a stage's other networks, such as sr2's
    VAE, are called too but not counted)."""
    total = 0
    for call in calls:
        ran = []
        hook = unet.register_forward_pre_hook(lambda *args: ran.append(True))
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        try:
            with counter:
                call()
        finally:
            hook.remove()
        if ran:
            total += counter.get_total_flops()
    return total


def step_gflops(stages=tuple(STEP_GFLOPS)) -> dict:
    """{stage: GFLOPs of one UNet call of its denoising step}, counted at the published sizes."""
    networks = published_networks_on_meta()
    counted = {}
    for stage in stages:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            for network in networks.networks(stage):
                network.to_empty(device="cpu")
            counted[stage] = round(unet_call_flops(getattr(networks, stage).unet, STAGE_CALLS[stage](networks)) / 1e9)
    return counted


if __name__ == "__main__":
    print(f"STEP_GFLOPS = {json.dumps(step_gflops())}")
