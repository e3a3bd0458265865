"""On CUDA the image stages may only use fused attention kernels: a math fallback must raise
instead of building sr2's attention matrices (about 231 GiB for one forward)."""

from contextlib import contextmanager

import torch

import show1.pipeline as pipeline_module
from show1.attention import fused_attention


def test_on_cuda_the_math_fallback_is_switched_off_and_restored_after():
    assert torch.backends.cuda.math_sdp_enabled()
    with fused_attention("cuda"):
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()


def test_on_the_cpu_nothing_changes():
    with fused_attention(torch.device("cpu")):
        assert torch.backends.cuda.math_sdp_enabled()


def test_every_image_stage_runs_under_fused_attention_and_text_encoding_does_not(tiny_pipeline, monkeypatch):
    """The text encoders attend over 77 tokens and T5 passes its position bias as a mask: they are
    left to any kernel. Every stage with image-sized attention checks its output inside the context."""
    inside, calls = [], []

    @contextmanager
    def recording_fused_attention(device):
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    def recorder(name, function):
        def record(*args, **kwargs):
            calls.append((name if name != "check_finite" else args[0], bool(inside)))
            return function(*args, **kwargs)

        return record

    monkeypatch.setattr(pipeline_module, "fused_attention", recording_fused_attention)
    monkeypatch.setattr(pipeline_module.text, "run", recorder("text", pipeline_module.text.run))
    monkeypatch.setattr(pipeline_module, "check_finite", recorder("check_finite", pipeline_module.check_finite))
    tiny_pipeline("a cat", keyframe_steps=1, interpolation_steps=1, output_stage="interpolated")
    assert calls == [("text", False), ("keyframes", True), ("interpolation", True)]
