"""How a video fails: an infinity that the sampler would hide, the GPU running out of memory under
its several names, and the stage each failure is reported in."""

import copy

import pytest
import torch

from show1.failures import FiniteOutputs, NonFiniteOutputError, failed_stage, is_out_of_memory
from show1.stages import keyframes

PROMPT = "a panda taking a selfie"


def infinity_on_call(unet, monkeypatch, call):
    """Makes the `call`-th forward of `unet` (1-based) return +inf in one element of the
    conditional half of the guidance batch, as a float16 overflow would."""
    original_forward, calls = unet.forward, []

    def forward(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            output.sample[1, 0, 0, 0, 0] = float("inf")
        return output

    monkeypatch.setattr(unet, "forward", forward)
    return calls


def test_dynamic_thresholding_hides_an_infinity_in_the_stage_output(tiny_pipeline, reference_text, small_keyframes,
                                                                   monkeypatch):
    """Why the network outputs are watched: the stage's own output stays finite. (Small keyframes,
    conftest.SMALL_KEYFRAMES: the thresholding clamps each value whatever the frame size.)"""
    parts = copy.copy(tiny_pipeline.components.keyframes)
    parts.scheduler = copy.deepcopy(parts.scheduler)
    assert parts.scheduler.config.thresholding
    calls = infinity_on_call(parts.unet, monkeypatch, call=2)
    with torch.no_grad():
        output = keyframes.run(parts, reference_text, steps=3, guidance=9.0, seed=0)
    assert len(calls) == 3
    assert torch.isfinite(output).all()


# Small keyframes (conftest.SMALL_KEYFRAMES) below: where a video fails does not depend on its size.


def test_an_infinity_in_a_network_output_mid_stage_fails_the_video_naming_the_stage(tiny_pipeline, small_keyframes,
                                                                                   monkeypatch):
    infinity_on_call(tiny_pipeline.components.keyframes.unet, monkeypatch, call=2)
    finished = []
    with pytest.raises(NonFiniteOutputError, match="Stage 'keyframes' produced non-finite values") as raised:
        tiny_pipeline(PROMPT, keyframe_steps=3, output_stage="keyframes",
                      on_stage_end=lambda stage, seconds: finished.append(stage))
    assert finished == ["text"]
    assert failed_stage(raised.value) == "keyframes"


def test_watching_outputs_leaves_no_hooks_behind_and_reads_every_output():
    network = torch.nn.Linear(2, 2)
    with FiniteOutputs([network]) as outputs:
        network(torch.ones(1, 2))
        assert bool(outputs.flag)
        network(torch.full((1, 2), float("inf")))
        network(torch.ones(1, 2))
        assert not bool(outputs.flag), "one non-finite output is enough"
    assert not network._forward_hooks
    network(torch.full((1, 2), float("nan")))
    assert not bool(outputs.flag) and outputs.flag.dim() == 0


def test_any_exception_names_the_stage_it_was_raised_in(tiny_pipeline, small_keyframes, monkeypatch):
    unet = tiny_pipeline.components.interpolation.unet

    def failing_forward(*args, **kwargs):
        raise ValueError("broken network")

    monkeypatch.setattr(unet, "forward", failing_forward)
    with pytest.raises(ValueError, match="broken network") as raised:
        tiny_pipeline(PROMPT, keyframe_steps=1, interpolation_steps=1, output_stage="interpolated")
    assert failed_stage(raised.value) == "interpolation"


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
])
def test_every_kind_of_gpu_memory_failure_is_recognised(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    ValueError("out of memory"),  # not a runtime failure
    MemoryError(),  # the host, not the GPU
])
def test_other_failures_are_not_taken_for_out_of_memory(error):
    assert not is_out_of_memory(error)
