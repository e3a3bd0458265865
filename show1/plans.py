"""Execution plans: where the networks wait between stages, and which plan a GPU gets.

A plan never changes what is computed, only where the weights live and how the work is batched.
The peaks below are predicted at the published sizes on fake tensors (`script/gpu-check --dry-run`,
bench/fake_memory.py) and a test keeps them equal to that prediction.
"""

from dataclasses import dataclass
from typing import Optional

GIB = 2**30


@dataclass(frozen=True)
class ExecutionPlan:
    """Where the networks wait and how the work is batched: never what is computed.

    name: how logs, tools and README name the plan.
    offload: networks wait on the CPU and visit the device only for their own stage, so the peak
        memory is that of the largest stage rather than of all of them (GPUs under ~30 GiB).
    interpolation_batch: interpolation segments per UNet call; None runs all 7 in one batch.
    """

    name: str
    offload: bool = False
    interpolation_batch: Optional[int] = None

    def home(self, device):
        """Where the networks wait between stages: the CPU when offloading, else the device."""
        return "cpu" if self.offload else device


RESIDENT = ExecutionPlan("resident")
LOW_MEMORY = ExecutionPlan("low_memory", offload=True)
# How the reference runs: every stage offloaded to the CPU between uses, one segment per call.
REFERENCE_PLAN = ExecutionPlan("reference", offload=True, interpolation_batch=1)

# Predicted peak GPU memory of a default 576x320 video (max_memory_allocated, GiB).
PREDICTED_PEAK_GIB = {RESIDENT.name: 27.69, LOW_MEMORY.name: 11.39}
# What a GPU's total memory holds beyond the allocator's peak: the CUDA context (about 0.5 GiB),
# the caching allocator's rounding and fragmentation, cuBLAS and cuDNN workspaces.
HEADROOM_GIB = 2.5


def plan_for_device_memory(total_bytes: int) -> ExecutionPlan:
    """The fastest plan whose predicted peak plus HEADROOM_GIB fits in `total_bytes` of device
    memory; the low-memory plan when none fits (it is the smallest)."""
    if PREDICTED_PEAK_GIB[RESIDENT.name] + HEADROOM_GIB <= total_bytes / GIB:
        return RESIDENT
    return LOW_MEMORY
