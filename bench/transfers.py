"""Bytes a default video moves between host and GPU memory under a plan, at the published sizes,
on a machine without a GPU.

The pipeline's own code moves the networks, stage by stage of a default video, in order
(Show1Pipeline._networks_on_device: show1.offload for the low-memory plan, `.to(...)` for the
reference's model offload). The networks are at their published sizes on the meta device, so
nothing is allocated, and `CopyLedger` plays the GPU: a TorchFunctionMode that sees every
`.to(...)`, `.cuda()`, `.cpu()`, `copy_` and `tensor.data = ...`, keeps a (weak) set of the tensors
that would live on the GPU, and adds up the bytes of each copy by direction. The stages' forward
calls are not run: the weights are what moves (the activations stay on the GPU).
"""

from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from show1.components import STAGES
from show1.offload import nbytes, pinned_footprint
from show1.pipeline import Show1Pipeline

from .fake_memory import published_networks_on_meta

GPU = torch.device("cuda", 0)
HOST = torch.device("cpu")


def _is_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


class CopyLedger(TorchFunctionMode):
    """Stands in for a GPU whose tensors are meta tensors: counts the bytes copied host->device
    ("h2d") and device->host ("d2h"). Only moves are simulated (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._on_gpu = WeakIdKeyDictionary()
        self.bytes = Counter()

    def on_gpu(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self._on_gpu

    def _place(self, tensor, on_gpu):
        if on_gpu:
            self._on_gpu[tensor] = True
        else:
            self._on_gpu.pop(tensor, None)
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        attribute = getattr(getattr(func, "__self__", None), "__name__", "")
        if attribute == "data" and name == "__set__":  # a tensor lives where its new data does
            func(*args, **kwargs)
            self._place(args[0], self.on_gpu(args[1]))
            return None
        if attribute == "data" and name == "__get__":  # the same memory, under another tensor object
            return self._place(func(*args, **kwargs), self.on_gpu(args[0]))
        if name in ("to", "cuda", "cpu") and isinstance(args[0], torch.Tensor):
            return self._move(name, args, kwargs)
        if name == "copy_" and self.on_gpu(args[0]) != self.on_gpu(args[1]):
            self.bytes["d2h" if self.on_gpu(args[1]) else "h2d"] += nbytes(args[1])
        return func(*args, **kwargs)

    def _destination(self, name, args, kwargs):
        """(whether the result lives on the GPU, its dtype or None) of a to/cuda/cpu call."""
        if name in ("cuda", "cpu"):
            return name == "cuda", None
        if len(args) > 1 and isinstance(args[1], torch.Tensor):  # tensor.to(other)
            return self.on_gpu(args[1]), args[1].dtype
        device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        return (self.on_gpu(args[0]) if device is None else _is_gpu(device)), dtype

    def _move(self, name, args, kwargs):
        source = args[0]
        to_gpu, dtype = self._destination(name, args, kwargs)
        moved = source if dtype is None else source.to(dtype)
        if to_gpu != self.on_gpu(source):
            self.bytes["h2d" if to_gpu else "d2h"] += nbytes(source)
            moved = moved.clone() if moved is source else moved  # a copy is a new tensor
        return self._place(moved, to_gpu)


@dataclass
class Transfers:
    plan: str
    h2d_bytes: int
    d2h_bytes: int
    weight_bytes: int
    pinned_host_bytes: int  # pinned host memory of the plan's own host copies on a GPU (0: it keeps none)


def count_transfers(plan, stages=STAGES) -> Transfers:
    """The bytes that the networks' moves copy in a video of `stages` (default: all six) under
    `plan` (show1.plans.ExecutionPlan), counted on the pipeline's own moves."""
    networks = published_networks_on_meta()
    weight_bytes = sum(nbytes(t) for network in networks.networks() for t in [*network.parameters(), *network.buffers()])
    pipe = Show1Pipeline(networks, GPU, plan)
    pipe._video_stages = tuple(stages)
    ledger = CopyLedger()
    with ledger:
        for stage in stages:
            with pipe._networks_on_device(stage):
                pass
    pinned = pinned_footprint(pipe._uploads.host.block_sizes) if pipe._uploads is not None else 0
    return Transfers(plan.name, ledger.bytes["h2d"], ledger.bytes["d2h"], weight_bytes, pinned)
