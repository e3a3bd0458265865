"""The low-memory plan's weights: one host copy, uploaded for its stage, never moved back.

The reference's model offload moves a stage's networks to the GPU before the stage and back with
`.to("cpu")` after it: about 48 GiB over PCIe per video, from pageable memory (which the host must
wait for while the driver stages it), and every return allocates fresh host memory, for weights
that never change. Here instead (show1.plans.Offload.UPLOAD):

- at setup, every weight gets one host copy (`HostCopies`), made once: pinned when the device is a
  CUDA GPU, so that uploads are DMA transfers the host does not wait for;
- before a stage, each parameter and buffer of its networks gets a device copy of its host copy,
  non-blocking, and `tensor.data` is swapped to it (the modules keep their own tensor objects);
- after the stage, `tensor.data` is swapped back to the host copy and the device copy is dropped:
  nothing travels back, and the host copies never change.

On a CUDA GPU the uploads run on a side stream (`SideStream`), so that the next stage's networks
can be uploaded while the current stage computes, wherever the predicted peak allows it
(show1.plans.prefetch_fits). diffusers' group offloading with use_stream=True overlaps uploads in
the same way, block by block inside one model; here the unit is a stage's networks, which its
denoising loop then runs many times.
"""

from contextlib import contextmanager

import torch

from .components import STAGES
from .plans import prefetch_fits

# Host copies are packed into blocks of this size: the pinned-memory allocator rounds every block
# up to a power of two, so pinning each tensor on its own would take 33 GiB for the 24.4 GiB of
# weights. Packed into 256 MiB blocks (the largest tensor, T5's embedding, is 251 MiB) only the
# last, partly filled block is rounded up.
BLOCK_BYTES = 2**28
# Where each tensor starts inside its block, in bytes: a multiple of every element size, and of the
# CUDA allocator's own alignment, so that copies start on aligned addresses.
ALIGNMENT = 512


def weight_tensors(networks) -> list:
    """Every parameter and buffer of `networks`, each once (a shared one is listed once)."""
    tensors = {}
    for network in networks:
        for tensor in [*network.parameters(), *network.buffers()]:
            tensors.setdefault(id(tensor), tensor)
    return list(tensors.values())


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def pack(sizes, block_bytes=BLOCK_BYTES):
    """Places pieces of `sizes` bytes into blocks: largest first, each into the first block with
    room for it (first-fit decreasing), a piece larger than a block into a block of its own.
    Returns (bytes used in each block, (block, offset) of each piece)."""
    used, capacity = [], []
    places = [None] * len(sizes)
    for piece in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = _aligned(sizes[piece])
        block = next((b for b in range(len(used)) if used[b] + size <= capacity[b]), None)
        if block is None:
            block = len(used)
            used.append(0)
            capacity.append(max(block_bytes, size))
        places[piece] = (block, used[block])
        used[block] += size
    return used, places


def pinned_footprint(block_sizes) -> int:
    """Host memory that pinned blocks of these sizes take: the pinned-memory allocator rounds each
    block up to a power of two."""
    return sum(1 << (size - 1).bit_length() for size in block_sizes if size)


class HostCopies:
    """One host copy of each of `tensors`, packed into a few large blocks (see BLOCK_BYTES), and
    each tensor's `.data` swapped to its copy: the networks wait on their host copies, and the
    memory the weights were loaded into is freed block by block, so setup needs little more than
    one copy of the weights.

    The blocks live in CPU memory (pinned when `pin`: only with a CUDA GPU), or on the meta device
    when the tensors are meta tensors (the published sizes in bench/, where nothing is allocated)."""

    def __init__(self, tensors, pin: bool):
        host = torch.device("meta") if all(t.is_meta for t in tensors) else torch.device("cpu")
        self.block_sizes, places = pack([nbytes(t) for t in tensors])
        members = [[] for _ in self.block_sizes]
        for index, (block, offset) in enumerate(places):
            members[block].append((index, offset))
        self.copies = [None] * len(tensors)
        for size, block_members in zip(self.block_sizes, members):
            memory = torch.empty(size, dtype=torch.uint8, device=host, pin_memory=pin)
            for index, offset in block_members:
                self.copies[index] = self._copy_into(memory, offset, tensors[index])

    @staticmethod
    def _copy_into(memory, offset, tensor):
        copy = memory[offset:offset + nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor.data)
        tensor.data = copy
        return copy


def swap_to_device_copies(pairs, device, on_copy=None):
    """Swaps each (tensor, host copy)'s `.data` to a new device copy of its host copy."""
    for tensor, host in pairs:
        copy = host.to(device, non_blocking=True)
        if on_copy is not None:
            on_copy(copy)
        tensor.data = copy


def swap_to_host_copies(pairs):
    """Swaps each tensor's `.data` back to its host copy; the device copy is freed."""
    for tensor, host in pairs:
        tensor.data = host


class SideStream:
    """Uploads on a CUDA stream of their own, so that they run while the compute stream works.

    The compute stream must not read a copy before it has arrived: each upload ends with an event,
    and the compute stream waits for it (`wait`, queued on the device: the host does not wait).
    The copies are allocated on the side stream but read by the compute stream, so each is also
    recorded as used by the compute stream (record_stream): when it is dropped, the caching
    allocator keeps its memory from the next upload until the kernels queued so far are done."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def upload(self, pairs):
        """Queues the uploads of `pairs` on the side stream; returns the event they end with."""
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            swap_to_device_copies(pairs, self.device, on_copy=lambda copy: copy.record_stream(compute))
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return ready

    def wait(self, ready):
        """Makes the compute stream wait until the uploads that `ready` ends have arrived."""
        torch.cuda.current_stream(self.device).wait_event(ready)


class WeightUploads:
    """The networks of every stage (a show1.components.Components), uploaded for their stage only.

    Use `stage(stage, next_stage)` around each stage, in order. `side_stream` is the SideStream of
    a CUDA GPU (made here when there is one); without it the uploads are queued on the current
    stream and nothing is prefetched, since nothing could overlap."""

    def __init__(self, components, device, side_stream=None):
        self.device = torch.device(device)
        by_stage = {stage: weight_tensors(components.networks(stage)) for stage in STAGES}
        # Every parameter and buffer; self.host.copies[i] is the host copy of self.tensors[i].
        self.tensors = [tensor for stage_tensors in by_stage.values() for tensor in stage_tensors]
        # Pinned memory and a side stream need a CUDA GPU, and weights in CPU memory rather than the
        # meta tensors that the tools in bench/ stand in with.
        cuda = self.device.type == "cuda" and torch.cuda.is_available() and not any(t.is_meta for t in self.tensors)
        self.host = HostCopies(self.tensors, pin=cuda)
        copy_of = {id(tensor): copy for tensor, copy in zip(self.tensors, self.host.copies)}
        self._pairs = {stage: [(t, copy_of[id(t)]) for t in stage_tensors] for stage, stage_tensors in by_stage.items()}
        if side_stream is None and cuda:
            side_stream = SideStream(self.device)
        self.side_stream = side_stream
        self._uploaded = {}  # {stage: the event its uploads end with (None without a side stream)}

    @property
    def on_device(self) -> list:
        """The stages whose networks have device copies now, in upload order."""
        return list(self._uploaded)

    @contextmanager
    def stage(self, stage, next_stage=None):
        """The stage's networks on the device for the block: uploaded unless prefetched, waited
        for, and dropped after it. `next_stage` (the stage that runs next, if any) is prefetched
        during the block where that fits; it stays on the device for its own block, unless this
        block raises. Whatever fails, an upload too (out of memory), leaves no device copies behind."""
        prefetched = None
        try:
            if stage not in self._uploaded:
                self._start_upload(stage)
            self._wait_for(stage)
            if self._may_prefetch(stage, next_stage):
                prefetched = next_stage
                self._start_upload(prefetched)
            yield
        except BaseException:
            if prefetched is not None:
                self._release(prefetched)
            raise
        finally:
            self._release(stage)

    def _may_prefetch(self, stage, next_stage) -> bool:
        return self.side_stream is not None and next_stage is not None and prefetch_fits(stage, next_stage)

    def _start_upload(self, stage):
        if self.side_stream is None:
            swap_to_device_copies(self._pairs[stage], self.device)
            self._uploaded[stage] = None
        else:
            self._uploaded[stage] = self.side_stream.upload(self._pairs[stage])

    def _wait_for(self, stage):
        if self.side_stream is not None:
            self.side_stream.wait(self._uploaded[stage])

    def _release(self, stage):
        swap_to_host_copies(self._pairs[stage])
        self._uploaded.pop(stage, None)
