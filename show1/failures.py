"""How a video fails: which stage it failed in, a non-finite result, and the GPU running out of
memory under any of its names.

The pipeline marks every exception that leaves a stage with that stage's id (`failed_stage`), so
a message can name the stage where it happened, not the last one that finished.
"""

import re
from typing import Optional

import torch


class NonFiniteOutputError(RuntimeError):
    """A stage produced NaN or infinity: a numerical failure, never a usable video."""


def non_finite_error(stage, output) -> NonFiniteOutputError:
    return NonFiniteOutputError(
        f"Stage '{stage}' produced non-finite values (NaN or infinity) in {output.dtype} on {output.device}. "
        "This is a numerical problem in the model's computation, not in the prompt; no video was written."
    )


def check_finite(stage, output, networks_finite: Optional[torch.Tensor] = None):
    """Raises NonFiniteOutputError when a stage's output is not finite, or when `networks_finite`
    (an on-device flag, see FiniteOutputs) says that one of its networks' outputs was not. One
    device sync per stage."""
    finite = torch.isfinite(output).all()
    if networks_finite is not None:
        finite = finite & networks_finite.to(finite.device)
    if not bool(finite):
        raise non_finite_error(stage, output)
    return output


class FiniteOutputs:
    """Whether every output of some networks stayed finite, as one flag that stays on the device.

    A stage's final output is not enough to tell: in half precision a UNet output can hold an
    infinity, which turns into an infinite x0 in the DPM-Solver, and dynamic thresholding clamps it
    back to a finite value. So each watched network's outputs are checked as they are produced
    (forward hooks); the flag is and-ed on the device, without any wait, and read once per stage
    by check_finite. Use as a context: the hooks are removed on exit.
    """

    def __init__(self, networks):
        self.flag: Optional[torch.Tensor] = None
        self._modules = [module for network in networks for module in _called_modules(network)]
        self._hooks = []

    def __enter__(self):
        self._hooks = [module.register_forward_hook(self._record) for module in self._modules]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, module, args, output):
        for tensor in _tensors(output):
            if tensor.is_floating_point():
                finite = torch.isfinite(tensor).all()
                self.flag = finite if self.flag is None else self.flag & finite


def _called_modules(network) -> list:
    """The network and its encoder/decoder halves: a VAE is called through those, not forward."""
    halves = [getattr(network, name, None) for name in ("encoder", "decoder")]
    return [network, *[half for half in halves if isinstance(half, torch.nn.Module)]]


def _tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [value for value in values if isinstance(value, torch.Tensor)]


def mark_failed_stage(error: BaseException, stage: str) -> None:
    """Records on `error` the stage it was raised in; the innermost stage wins."""
    if failed_stage(error) is None:
        error.show1_stage = stage


def failed_stage(error: BaseException) -> Optional[str]:
    """The id of the stage an exception from Show1Pipeline.__call__ was raised in, if any."""
    return getattr(error, "show1_stage", None)


# The GPU running out of memory is not always torch.OutOfMemoryError: cuBLAS and cuDNN allocate
# their own handles and workspaces and report failures as plain RuntimeErrors, e.g.
#   "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
#   "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"
#   "CUDA error: out of memory" (a CUDA call outside the caching allocator)
OUT_OF_MEMORY_PATTERNS = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"
    r"|CUFFT_ALLOC_FAILED",
    re.IGNORECASE,
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that the GPU (or a library on it) could not get memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and bool(OUT_OF_MEMORY_PATTERNS.search(str(error)))
