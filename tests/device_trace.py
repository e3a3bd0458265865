"""Find, without a GPU, every place where the host would wait for a CUDA device or copy to or from it.

On a GPU, the host queues kernels and runs ahead; it stalls only when it needs a value that lives
on the device (`.item()`, `if tensor:`, `int(tensor)`, indexing a CPU table with a device scalar,
`nonzero`, boolean-mask indexing, `.cpu()`, `.numpy()`, ...), and every host->device copy (a
`.to("cuda")` of CPU data, `torch.tensor(..., device="cuda")`) is a transfer in the stream. Those
places decide whether a denoising loop keeps the GPU busy, yet on a CPU-only machine nothing
distinguishes them from ordinary arithmetic.

`VirtualDevice` is a `TorchFunctionMode`, so it sees every torch call made while it is active.
It computes everything on the CPU, for real, but keeps a (weak) set of the tensors that would live
on the device: those it was told about (`place`: a module's parameters and buffers, inputs), those
created with `device="cuda"`, those moved with `.to("cuda")` / `.cuda()`, the results of any
operation on such tensors, and a tensor whose `.data` is set to one of them (as offloading code swaps
a parameter's data between a host copy and a device copy; set back to a host tensor, it leaves). For those tensors it answers `.device` with `cuda:0` and `.is_cuda` with
True, so the code under test (`unet.device`, `sample.device`, ...) takes the path it takes on a GPU.

Each call is then classified, and what a GPU would wait for is recorded as an `Event` with the
source lines (outside torch) that caused it:

- "sync": the host reads a device value (`item`, `__bool__`, `__int__`, `__index__`, `nonzero`,
  `unique`, `equal`, `__format__`, boolean-mask indexing, a CPU tensor indexed by a device scalar).
- "d2h": a device -> host copy (`.cpu()`, `.to("cpu")`, `.numpy()`, `.tolist()`, `copy_`).
- "h2d": a host -> device copy (`.to("cuda")` of a CPU tensor, `torch.tensor(data, device="cuda")`,
  a CPU tensor written into or indexing a device tensor).
- "h2d-cpu-draw": an h2d copy of random numbers just drawn from a CPU `torch.Generator`, the way a
  pipeline reproduces a reference's random numbers whatever the device.
- "mismatch": what raises on a GPU instead of waiting: a device tensor combined with a CPU tensor
  that is not a 0-dim scalar, a CPU generator asked to draw on the device.

A 0-dim CPU tensor combined with device tensors is not an event: CUDA kernels take it as a scalar
argument read on the host, which is how a scheduler's CPU tables can drive device arithmetic
without any wait.

`progress` is an iterable wrapper (the `progress=` argument the stages pass to their denoising
loop) that tags events with the loop and step they happen in, so a test can count per step what
happens inside a denoising loop, apart from the setup before it and the work after it.
"""

import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

DEVICE = torch.device("cuda", 0)
HOST = torch.device("cpu")

# Methods that return a host value computed from a device tensor: the host waits for the device.
SYNC_METHODS = {
    "item", "is_nonzero", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__contains__", "nonzero",
    "argwhere", "unique", "unique_consecutive", "masked_select", "equal", "allclose", "bincount",
    "__format__", "__repr__", "__str__",
}
# Methods that copy a device tensor's data to the host (a copy implies a wait).
TO_HOST_METHODS = {"numpy", "tolist", "__array__"}
# Factories whose data comes from the host: with device="cuda" they copy it there.
FROM_HOST_FACTORIES = {"tensor", "as_tensor", "asarray", "new_tensor"}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_HERE)) + os.sep


@dataclass(frozen=True)
class Event:
    kind: str  # "sync", "d2h", "h2d", "h2d-cpu-draw" or "mismatch"
    detail: str
    where: str  # the innermost source lines outside torch, innermost first
    step: Optional[Tuple[int, int]]  # (loop, step) inside a denoising loop, None outside
    nbytes: int = 0

    def __str__(self):
        size = f" [{self.nbytes} B]" if self.nbytes else ""
        return f"{self.kind:12} {self.detail}{size}  at {self.where}"


def _caller(depth):
    """'file:line (function)' of the innermost `depth` frames outside torch and this file."""
    frames, frame = [], sys._getframe(1)
    while frame is not None and len(frames) < depth:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename != _HERE:
            name = filename.split("site-packages" + os.sep)[-1]
            name = name[len(_ROOT):] if name.startswith(_ROOT) else name
            frames.append(f"{name}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(frames)


def _is_device(device):
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _shape(tensor):
    return tuple(tensor.shape)


class VirtualDevice(TorchFunctionMode):
    """A CUDA device simulated on the CPU that records syncs and copies (see the module docstring)."""

    def __init__(self, depth=3):
        super().__init__()
        self._on_device = WeakIdKeyDictionary()
        self._cpu_draws = WeakIdKeyDictionary()
        self.depth = depth
        self.events = []
        self.step = None  # (loop, step) while inside a denoising loop
        self.loop_lengths = []  # steps run by each denoising loop, in order

    # --- what lives on the device -------------------------------------------------------------

    def place(self, obj):
        """Declares a tensor, or a module's parameters and buffers, as living on the device."""
        if isinstance(obj, torch.nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                self._on_device[tensor] = True
        elif isinstance(obj, torch.Tensor):
            self._on_device[obj] = True
        return obj

    def on_device(self, tensor):
        return isinstance(tensor, torch.Tensor) and tensor in self._on_device

    def _place_all(self, out):
        return tree_map(lambda t: self.place(t) if isinstance(t, torch.Tensor) else t, out)

    # --- phases ------------------------------------------------------------------------------

    def progress(self, iterable):
        """Use as a stage's `progress=`: events while step i of loop n runs are tagged (n, i)."""
        loop = len(self.loop_lengths)
        self.loop_lengths.append(0)

        def steps():
            for index, item in enumerate(iterable):
                self.step = (loop, index)
                self.loop_lengths[loop] = index + 1
                yield item
            self.step = None

        return steps()

    def in_loops(self):
        return [e for e in self.events if e.step is not None]

    def outside_loops(self):
        return [e for e in self.events if e.step is None]

    def per_step(self):
        """{(loop, step): Counter(kind -> count)} for every step run, including steps with no events."""
        counts = {(loop, step): Counter() for loop, n in enumerate(self.loop_lengths) for step in range(n)}
        for event in self.in_loops():
            counts[event.step][event.kind] += 1
        return counts

    def report(self, events=None):
        """One line per distinct event, with its count, grouped by phase."""
        rows = Counter((("setup/after" if e.step is None else f"loop {e.step[0]} step {e.step[1]}"), str(e))
                       for e in (self.events if events is None else events))
        return "\n".join(f"  {phase:18} x{count:<3} {line}" for (phase, line), count in rows.items())

    # --- interception ------------------------------------------------------------------------

    def _record(self, kind, detail, nbytes=0):
        self.events.append(Event(kind, detail, _caller(self.depth), self.step, nbytes))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")

        if name == "__get__":  # a tensor property: tensor.device, tensor.is_cuda, tensor.data, ...
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            tensor = args[0]
            if attribute == "device":
                return DEVICE if self.on_device(tensor) else func(*args, **kwargs)
            if attribute == "is_cuda":
                return self.on_device(tensor)
            if attribute == "is_cpu":
                return not self.on_device(tensor)
            out = func(*args, **kwargs)
            return self.place(out) if isinstance(out, torch.Tensor) and self.on_device(tensor) else out

        if name == "__set__" and getattr(getattr(func, "__self__", None), "__name__", "") == "data":
            tensor, data = args[0], args[1]
            func(*args, **kwargs)
            if self.on_device(data):
                self.place(tensor)
            else:
                self._on_device.pop(tensor, None)
            return None

        if name == "get_device" and isinstance(args[0], torch.Tensor):
            return 0 if self.on_device(args[0]) else -1

        if name in ("to", "cuda", "cpu") and isinstance(args[0], torch.Tensor):
            return self._move(name, args, kwargs)

        if name == "copy_":
            destination, source = args[0], args[1]
            if isinstance(source, torch.Tensor) and self.on_device(destination) != self.on_device(source):
                kind = "d2h" if self.on_device(source) else self._h2d_kind(source)
                self._record(kind, f"copy_ {source.dtype} {_shape(source)}", source.numel() * source.element_size())
            return func(*args, **kwargs)

        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        device_inputs = [t for t in tensors if self.on_device(t)]

        if "device" in kwargs and kwargs["device"] is not None:
            return self._factory(func, name, args, kwargs)

        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and generator.device.type == "cpu" and device_inputs:
            self._record("mismatch", f"{name}: a CPU generator drawing into a device tensor")

        if device_inputs:
            self._check_device_call(name, args, tensors, device_inputs)
            if name == "__iter__":
                return iter([self.place(t) for t in args[0].unbind(0)])

        out = func(*args, **kwargs)
        if not device_inputs and isinstance(out, torch.Tensor):
            drawn = isinstance(generator, torch.Generator) or any(t in self._cpu_draws for t in tensors)
            if drawn:  # a draw, or a host value computed from one
                self._cpu_draws[out] = True
        if device_inputs and name not in TO_HOST_METHODS and name != "__setitem__":
            out = self._place_all(out)
        return out

    def _h2d_kind(self, source):
        return "h2d-cpu-draw" if isinstance(source, torch.Tensor) and source in self._cpu_draws else "h2d"

    def _move(self, name, args, kwargs):
        source = args[0]
        kwargs.pop("copy", None)
        if name == "cuda":
            target, dtype, rest = DEVICE, None, {"non_blocking": kwargs.get("non_blocking", False)}
        elif name == "cpu":
            target, dtype, rest = HOST, None, {}
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):  # tensor.to(other)
            other = args[1]
            target, dtype, rest = (DEVICE if self.on_device(other) else HOST), other.dtype, {}
        else:
            target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            rest = {"non_blocking": non_blocking}
            if memory_format is not None:
                rest["memory_format"] = memory_format
        out = source.to(dtype=dtype, **rest) if dtype is not None or len(rest) > 1 else source
        if out is not source and source in self._cpu_draws:
            self._cpu_draws[out] = True
        from_device = self.on_device(source)
        to_device = from_device if target is None else _is_device(target)
        if from_device != to_device:
            nbytes = source.numel() * source.element_size()
            kind = "d2h" if from_device else self._h2d_kind(source)
            self._record(kind, f"{name} {source.dtype} {_shape(source)}", nbytes)
            out = out.clone() if out is source else out
        return self.place(out) if to_device else out

    def _factory(self, func, name, args, kwargs):
        """A call with an explicit device=: the result lives there, whatever the inputs."""
        to_device = _is_device(kwargs["device"])
        if to_device:
            kwargs["device"] = "cpu"
        generator = kwargs.get("generator")
        if to_device and isinstance(generator, torch.Generator) and generator.device.type == "cpu":
            self._record("mismatch", f"{name}: a CPU generator drawing on the device")
        if name in FROM_HOST_FACTORIES:
            data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
            if to_device and not self.on_device(data):
                nbytes = data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0
                self._record(self._h2d_kind(data), f"{name}(..., device=cuda) of host data", nbytes)
            elif not to_device and self.on_device(data):
                self._record("d2h", f"{name}(..., device=cpu) of device data")
        out = func(*args, **kwargs)
        if not to_device and isinstance(generator, torch.Generator) and isinstance(out, torch.Tensor):
            self._cpu_draws[out] = True
        return self._place_all(out) if to_device else out

    def _check_device_call(self, name, args, tensors, device_inputs):
        """Records what a call with device tensors among its inputs waits for or copies."""
        first = device_inputs[0]
        if name in SYNC_METHODS:
            self._record("sync", f"{name} of a device tensor {_shape(first)}")
            return
        if name in TO_HOST_METHODS:
            self._record("d2h", f"{name} of a device tensor {_shape(first)}", first.numel() * first.element_size())
            return
        if name == "where" and len(args) == 1:
            self._record("sync", f"where(condition) of a device tensor {_shape(first)} (nonzero)")
            return
        if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self._record("sync", "repeat_interleave with tensor repeats")
            return
        if name == "new_tensor" and self.on_device(args[0]) and not self.on_device(args[1]):
            self._record("h2d", "new_tensor of host data")
            return
        if name in ("__getitem__", "__setitem__"):
            self._check_indexing(name, args)
            return
        host_tensors = [t for t in tensors if not self.on_device(t) and t.dim() > 0]
        if host_tensors:
            shapes = [_shape(t) for t in host_tensors]
            self._record("mismatch", f"{name}: device tensors with host tensors {shapes}")

    def _check_indexing(self, name, args):
        base, index = args[0], args[1]
        index_tensors = [t for t in tree_flatten(index)[0] if isinstance(t, torch.Tensor)]
        if not self.on_device(base):
            for t in index_tensors:
                if self.on_device(t) and t.dim() == 0 and not t.is_floating_point():
                    self._record("sync", f"host tensor {_shape(base)} indexed by a device scalar")
                elif self.on_device(t):
                    self._record("mismatch", f"host tensor {_shape(base)} indexed by a device tensor {_shape(t)}")
            if name == "__setitem__" and self.on_device(args[2]):
                self._record("d2h", f"device value written into a host tensor {_shape(base)}")
            return
        for t in index_tensors:
            if t.dtype in (torch.bool, torch.uint8):
                self._record("sync", f"device tensor {_shape(base)} indexed by a mask (nonzero)")
            elif not self.on_device(t) and t.dim() > 0:
                self._record("h2d", f"host index {_shape(t)} into a device tensor", t.numel() * t.element_size())
        if name == "__setitem__" and isinstance(args[2], torch.Tensor) and not self.on_device(args[2]):
            value = args[2]
            self._record(self._h2d_kind(value), f"host value {_shape(value)} written into a device tensor",
                         value.numel() * value.element_size())
