"""Half precision on the CPU: every stage runs in float16 and bfloat16 and stays finite, each network
in its planned dtype, and the networks' half-precision outputs stay near float32.

float16 is emulated on this CPU and slow, so the stages run on small crops with 1-2 steps. The
numbers printed here (-s) are the ones docs/fidelity.md, 'Half precision', quotes.
"""

import pytest
import torch

from conftest import REFERENCE_WEIGHTS, expected
from show1 import Show1Pipeline
from show1.components import NETWORKS, component
from show1.failures import NonFiniteOutputError, check_finite
from show1.stages import first_frame, interpolation, keyframes, sr1, sr2
from show1.stages.text import encode_clip, encode_t5
from show1.weights.loading import load_component
from test_unet import float32_forward, forward, load_unet

HALF_DTYPES = (torch.float16, torch.bfloat16)
PROMPT = "a panda taking a selfie"
# Low-resolution crop of the pixel stages: 8x8 -> 32x32 in the super-resolution stages, the
# smallest that keeps every UNet level at 2x2 or more (sr1 halves 32x32 four times). Whether a
# stage stays finite in half precision does not depend on the frame size: the sr1 case below
# (float16 scheduler steps, all NaN) fails at this crop as it did at 16x16, at a quarter of the
# work, which matters where float16 is emulated.
CROP = 8
SR2_SIZE = 32  # sr2's output, for the same reason: 4x4 latents, 2x2 at the UNet's lower level


@pytest.fixture(scope="module", params=HALF_DTYPES, ids=lambda d: str(d).split(".")[-1])
def half_pipeline(request):
    """The tiny cascade with every network loaded in one half dtype (`half_pipeline.half_dtype`)."""
    pipe = Show1Pipeline.from_pretrained(REFERENCE_WEIGHTS, device="cpu", dtype=request.param)
    pipe.set_progress_bar_config(disable=True)
    pipe.half_dtype = request.param
    return pipe


@pytest.fixture(scope="module")
def half_text(half_pipeline):
    c = half_pipeline.components.text
    return encode_t5(c.t5_tokenizer, c.t5, PROMPT)


def low_resolution_video(frames):
    """Reference keyframes cropped to CROP x CROP: realistic values, small enough for emulated float16."""
    keyframes = torch.from_numpy(expected("keyframes")["frames"])[:, :, :, :CROP, :CROP]
    return keyframes[:, :, torch.arange(frames) % keyframes.shape[2]]


def assert_finite_float32(output, shape):
    assert output.shape == shape
    assert output.dtype == torch.float32
    assert torch.isfinite(output).all()


def test_every_network_is_loaded_in_its_planned_dtype(half_pipeline):
    dtype, c = half_pipeline.half_dtype, half_pipeline.components
    for network in NETWORKS:
        if network.key != "text.t5":
            assert {p.dtype for p in c[network.key].parameters()} == {dtype}, network.key
    t5_dtypes = {name: p.dtype for name, p in c.text.t5.named_parameters()}
    # T5's feed-forward output projections stay float32 in float16 (their activations overflow it).
    wo_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert {d for name, d in t5_dtypes.items() if ".wo." in name} == {wo_dtype}
    assert {d for name, d in t5_dtypes.items() if ".wo." not in name} == {dtype}


def test_keyframes_in_half_precision(half_pipeline, half_text, monkeypatch):
    monkeypatch.setattr(keyframes, "HEIGHT", CROP)
    monkeypatch.setattr(keyframes, "WIDTH", CROP)
    output = keyframes.run(half_pipeline.components.keyframes, half_text, steps=2, guidance=9.0, seed=0)
    assert_finite_float32(output, (1, 3, 8, CROP, CROP))


def test_interpolation_in_half_precision(half_pipeline, half_text):
    output = interpolation.run(
        half_pipeline.components.interpolation, half_text, low_resolution_video(8), steps=1, guidance=4.0, seed=0
    )
    assert_finite_float32(output, (1, 3, 29, CROP, CROP))


def test_first_frame_in_half_precision(half_pipeline, half_text):
    output = first_frame.run(
        half_pipeline.components.first_frame, half_text, low_resolution_video(1), steps=2, guidance=4.0,
        noise_level=150, seed=0,
    )
    assert_finite_float32(output, (1, 3, 1, 4 * CROP, 4 * CROP))


def test_sr1_window_in_half_precision(half_pipeline, half_text):
    """One window, 8x8 -> 32x32, 2 steps: the case whose float16 DPM-Solver step gave all NaN
    (x0 overflowed at t=999 before the thresholding) when the scheduler stepped in float16 (found
    at 16x16 -> 64x64; a scheduler step in float16 gives all NaN at this crop too)."""
    anchor = torch.zeros(1, 3, 1, 4 * CROP, 4 * CROP)
    output = sr1.run(
        half_pipeline.components.sr1, half_text, low_resolution_video(8), anchor, steps=2, guidance=7.0,
        noise_level=250, seed=0,
    )
    assert_finite_float32(output, (1, 3, 8, 4 * CROP, 4 * CROP))


def test_sr2_in_half_precision(half_pipeline, monkeypatch):
    monkeypatch.setattr(sr2, "HEIGHT", SR2_SIZE)
    monkeypatch.setattr(sr2, "WIDTH", SR2_SIZE)
    c = half_pipeline.components
    clip_text = encode_clip(c.text.clip_tokenizer, c.text.clip, PROMPT, "low resolution, blur")
    video = low_resolution_video(2)
    output = sr2.run(c.sr2, clip_text, video, steps=2, strength=1.0, guidance=15.0, seed=0)
    assert_finite_float32(output, (1, 3, 2, SR2_SIZE, SR2_SIZE))


# --- half precision against float32, network by network ------------------------------------

# Mean error of a half-precision forward relative to the float32 output's mean magnitude, on the
# reference fixture inputs (docs/fidelity.md, 'Half precision': float16 at 5.4e-3, 3.2e-3,
# 3.4e-3, 2.5e-2, 2.1e-3); the bounds leave about 2x headroom. A wrong network (another head split) is off by
# order 1, and bfloat16 is about 10x further than float16 on every UNet.
UNET_FLOAT16_BOUNDS = {"if2": 1e-2, "base": 6e-3, "interpolation": 6e-3, "sr1": 5e-2, "sr2": 4e-3}


def unet_output(name, dtype):
    """One forward of UNet `name` loaded in `dtype`, on the reference fixture's inputs, as float32.
    The float32 one is test_unet's, computed once for both modules."""
    if dtype == torch.float32:
        return float32_forward(name)
    return forward(name, load_unet(name, dtype))


@pytest.mark.parametrize("name", sorted(UNET_FLOAT16_BOUNDS))
def test_unet_in_half_precision_stays_near_float32(name):
    full = unet_output(name, torch.float32)
    errors = {dtype: (unet_output(name, dtype) - full).abs() for dtype in HALF_DTYPES}
    relative = {dtype: error.mean().item() / full.abs().mean().item() for dtype, error in errors.items()}
    print(f"unet {name}: mean error / mean |output|: float16 {relative[torch.float16]:.2e}, "
          f"bfloat16 {relative[torch.bfloat16]:.2e}; max error / max |output|: float16 "
          f"{errors[torch.float16].max().item() / full.abs().max().item():.2e}")
    assert relative[torch.float16] <= UNET_FLOAT16_BOUNDS[name]
    # float16 carries 3 more mantissa bits than bfloat16: it is the closer of the two.
    assert relative[torch.float16] < relative[torch.bfloat16]


def text_states(dtype):
    c = {key: load_component(REFERENCE_WEIGHTS, component(f"text.{key}"), "cpu", dtype)
         for key in ("t5", "t5_tokenizer", "clip", "clip_tokenizer")}
    t5 = encode_t5(c["t5_tokenizer"], c["t5"], PROMPT)
    clip = encode_clip(c["clip_tokenizer"], c["clip"], PROMPT, "low resolution, blur")
    return {"t5": t5.cond.float(), "clip": clip.cond.float()}


def test_text_encoders_in_half_precision_stay_near_float32():
    """T5 in float16 as loaded by transformers (its `wo` layers in float32) and CLIP in float16 are
    closer to float32 than in bfloat16: the pipeline runs them in float16."""
    full = text_states(torch.float32)
    half = {dtype: text_states(dtype) for dtype in HALF_DTYPES}
    for name in ("t5", "clip"):
        errors = {dtype: (half[dtype][name] - full[name]).abs().mean().item() for dtype in HALF_DTYPES}
        print(f"{name}: mean abs error float16 {errors[torch.float16]:.2e}, bfloat16 {errors[torch.bfloat16]:.2e}")
        assert errors[torch.float16] < errors[torch.bfloat16]
        assert errors[torch.float16] <= 3e-3  # measured 1.35e-3 (T5), 4.7e-4 (CLIP)


# --- non-finite output ------------------------------------------------------------------------


def test_a_non_finite_stage_output_raises_naming_the_stage():
    with pytest.raises(NonFiniteOutputError, match="Stage 'sr1' produced non-finite values"):
        check_finite("sr1", torch.tensor([0.0, float("nan")]))
    with pytest.raises(NonFiniteOutputError, match="numerical problem"):
        check_finite("sr2", torch.tensor([float("inf")]))
    finite = torch.ones(3)
    assert check_finite("keyframes", finite) is finite


def test_the_pipeline_stops_at_the_first_stage_with_nan(tiny_pipeline, small_keyframes, monkeypatch):
    # Small keyframes (conftest.SMALL_KEYFRAMES): where a video stops does not depend on its size.
    unet = tiny_pipeline.components.interpolation.unet
    original_forward = unet.forward

    def nan_forward(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        output.sample[0, 0, 0, 0, 0] = float("nan")
        return output

    monkeypatch.setattr(unet, "forward", nan_forward)
    finished = []
    with pytest.raises(NonFiniteOutputError, match="Stage 'interpolation'"):
        tiny_pipeline(PROMPT, keyframe_steps=1, interpolation_steps=1, output_stage="interpolated",
                      on_stage_end=lambda stage, seconds: finished.append(stage))
    assert finished == ["text", "keyframes"]
