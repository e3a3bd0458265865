"""Speed switches that only a GPU can judge, applied from outside to the networks of a built
pipeline, and timed side by side with the plain (eager) forward.

- compile: torch.compile of each UNet's forward (the forward only: the scheduler loop has
  data-dependent branches and stays eager; every UNet forward compiles without graph breaks).
- cudagraphs: torch.compile(mode="reduce-overhead"), which replays the forward as one CUDA graph,
  for the small fixed-shape stages whose time goes to launching some 2,000 kernels per forward.
- channels_last: convolution weights in channels-last layout (NHWC tensor-core kernels).

The pipeline uses none of them until they are measured. Each is timed on the arguments of a real
forward of the stage (captured during a run of the cascade), after warm-up calls whose time is the
compile or capture time that a cold boot pays.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from show1.attention import fused_attention
from show1.components import COMPONENTS

from .step_clock import synchronize

# The denoising stages: each calls its `unet` once per step.
UNET_STAGES = tuple(c.stage for c in COMPONENTS if c.name == "unet")
# Fixed shapes and launch-bound: the stages where a CUDA graph can pay.
GRAPH_STAGES = ("keyframes", "interpolation", "first_frame")
# Enough calls for torch.compile to compile, and for reduce-overhead to record and replay its graph.
WARMUP_CALLS = 3


@contextmanager
def eager(network):
    yield


@contextmanager
def channels_last(network):
    """Convolution weights channels-last (4-D) or channels-last-3d (5-D), restored afterwards."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    convolutions = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    for conv in convolutions:
        conv.weight.data = conv.weight.data.contiguous(memory_format=formats[conv.weight.dim()])
    try:
        yield
    finally:
        for conv in convolutions:
            conv.weight.data = conv.weight.data.contiguous()


def compiled_forward(mode=None):
    @contextmanager
    def apply(network):
        # An instance attribute shadows the class's forward, so the module's __call__ (and its
        # hooks) stay as they are; deleting it restores the eager forward.
        network.forward = torch.compile(network.forward, mode=mode)
        try:
            yield
        finally:
            del network.forward
            torch._dynamo.reset()  # frees the compiled code and any CUDA graph memory pool

    return apply


SWITCHES = {
    "eager": (eager, None),
    "channels_last": (channels_last, None),
    "compile": (compiled_forward(), None),
    "cudagraphs": (compiled_forward("reduce-overhead"), GRAPH_STAGES),
}
GPU_ONLY = {"cudagraphs"}


class FirstCall:
    """Keeps the arguments of a network's first forward call (a forward pre-hook)."""

    def __init__(self, network):
        self.args, self.kwargs = None, None
        self._hook = network.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs
        self._hook.remove()


@dataclass
class SwitchResult:
    switch: str
    stage: str
    status: str  # "measured", or why not ("skipped-on-cpu", "skipped: time budget", "failed: ...")
    seconds_per_forward: Optional[float] = None
    warmup_seconds: Optional[float] = None  # the warm-up calls: compile / capture included


def timed_calls(call, device, count) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        call()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_switch(name, stage, network, first_call, device, repeats, warmup_calls=WARMUP_CALLS) -> SwitchResult:
    """Applies switch `name` to the stage's network, warms up with `warmup_calls` forwards, times
    `repeats` forwards."""
    apply, _ = SWITCHES[name]

    def call():
        return network(*first_call.args, **first_call.kwargs)

    try:
        # Under the attention kernels that serving allows (show1.pipeline runs image stages so).
        with apply(network), fused_attention(device):
            warmup = timed_calls(call, device, warmup_calls)
            per_forward = timed_calls(call, device, repeats) / repeats
    except Exception as error:  # a switch that breaks is a finding, not the end of the check
        return SwitchResult(name, stage, f"failed: {type(error).__name__}: {str(error)[:200]}")
    return SwitchResult(name, stage, "measured", per_forward, warmup)


def switch_applies(name, stage) -> bool:
    _, stages = SWITCHES[name]
    return stages is None or stage in stages


def measure_switches(names, components, first_calls, device, repeats, deadline, warmup_calls=WARMUP_CALLS) -> list:
    """Every applicable (switch, stage) pair, eager first. Pairs that cannot run here or would
    start after `deadline` (a perf_counter time) are reported as skipped."""
    results = []
    for name in ["eager", *[n for n in names if n != "eager"]]:
        for stage in UNET_STAGES:
            if not switch_applies(name, stage):
                continue
            if name in GPU_ONLY and torch.device(device).type != "cuda":
                results.append(SwitchResult(name, stage, "skipped-on-cpu"))
            elif first_calls[stage].args is None:
                results.append(SwitchResult(name, stage, "skipped: stage not run"))
            elif time.perf_counter() > deadline:
                results.append(SwitchResult(name, stage, "skipped: time budget"))
            else:
                results.append(measure_switch(name, stage, getattr(components, stage).unet, first_calls[stage], device,
                                              repeats, warmup_calls))
    return results
