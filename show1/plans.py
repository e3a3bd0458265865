"""Execution plans: where the networks wait between stages, and which plan a GPU gets.

A plan never changes what is computed, only where the weights live and how the work is batched.
The peaks below are predicted at the published sizes on fake tensors (`script/gpu-check --dry-run`,
bench/fake_memory.py) and a test keeps them equal to that prediction.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Optional

GIB = 2**30


class Offload(Enum):
    """How an offloading plan brings a stage's networks to the device, and takes them off after it.

    Both keep the peak at that of the largest stage; they differ in what crosses the bus.
    """

    MODEL = "model"
    """The reference's model offload: each network is moved to the device with `.to(device)` before
    its stage and back with `.to("cpu")` after it. Every weight crosses the bus twice per video (about
    48 GiB), from and into pageable memory that is allocated afresh on every return."""

    UPLOAD = "upload"
    """Upload only (show1.offload): one host copy of every weight is made at setup (pinned on a
    CUDA GPU); a stage's networks are uploaded from it before the stage and their device copies are
    dropped after it, so each weight crosses the bus once per video and nothing comes back. On a
    CUDA GPU the next stage's networks are uploaded while the current stage computes, where
    prefetch_fits allows it."""


@dataclass(frozen=True)
class ExecutionPlan:
    """Where the networks wait and how the work is batched: never what is computed.

    name: how logs, tools and README name the plan.
    offload: None keeps every network on the device. Otherwise the networks wait on the CPU and
        visit the device only for their own stage, so the peak memory is that of the largest stage
        rather than of all of them (GPUs under ~30 GiB); the Offload member says how they get there.
    interpolation_batch: interpolation segments per UNet call; None runs all 7 in one batch.
    """

    name: str
    offload: Optional[Offload] = None
    interpolation_batch: Optional[int] = None

    def idle_device(self, device):
        """Where the networks wait between their stages: the CPU when offloading, else the device
        they compute on."""
        return "cpu" if self.offload is not None else device


RESIDENT = ExecutionPlan("resident")
LOW_MEMORY = ExecutionPlan("low_memory", offload=Offload.UPLOAD)
# How the reference runs: every stage's networks moved to the device and back (model offload), one
# segment per call.
REFERENCE_PLAN = ExecutionPlan("reference", offload=Offload.MODEL, interpolation_batch=1)

# Predicted peak GPU memory of a default 576x320 video (max_memory_allocated, GiB).
PREDICTED_PEAK_GIB = {RESIDENT.name: 27.29, LOW_MEMORY.name: 11.39}
# The same prediction per stage: the weights of its networks, and the activation peak of its
# largest forward call (GiB).
PREDICTED_STAGE_WEIGHTS_GIB = {"text": 11.38, "keyframes": 3.22, "interpolation": 3.22, "first_frame": 2.32,
                               "sr1": 1.48, "sr2": 2.78}
PREDICTED_STAGE_ACTIVATIONS_GIB = {"text": 0.01, "keyframes": 0.45, "interpolation": 1.96, "first_frame": 0.34,
                                   "sr1": 2.19, "sr2": 2.90}
# The low-memory plan's goal: a T4 (14.7 GiB in all) less its CUDA context.
LOW_MEMORY_GOAL_GIB = 14.0


def prefetch_fits(stage: str, next_stage: str) -> bool:
    """Whether the low-memory plan may upload `next_stage`'s networks while `stage` computes: the
    stage's weights and activation peak plus the next stage's weights, as predicted, stay within
    LOW_MEMORY_GOAL_GIB. (Not during the text stage: T5 alone is 11.4 GiB.)"""
    during = PREDICTED_STAGE_WEIGHTS_GIB[stage] + PREDICTED_STAGE_ACTIVATIONS_GIB[stage]
    return during + PREDICTED_STAGE_WEIGHTS_GIB[next_stage] <= LOW_MEMORY_GOAL_GIB
# What a GPU's total memory holds beyond the allocator's peak: the CUDA context (about 0.5 GiB),
# the caching allocator's rounding and fragmentation, cuBLAS and cuDNN workspaces.
HEADROOM_GIB = 2.5


def plan_for_device_memory(total_bytes: int) -> ExecutionPlan:
    """The fastest plan whose predicted peak plus HEADROOM_GIB fits in `total_bytes` of device
    memory; the low-memory plan when none fits (it is the smallest)."""
    if PREDICTED_PEAK_GIB[RESIDENT.name] + HEADROOM_GIB <= total_bytes / GIB:
        return RESIDENT
    return LOW_MEMORY


# Total memory as torch.cuda.get_device_properties reports it on the GPUs that Replicate offers, GiB.
REPLICATE_GPU_TOTAL_GIB = {"T4": 14.7, "A10G": 22.0, "A100 40GB": 39.6, "L40S": 44.4, "A100/H100 80GB": 79.2}
