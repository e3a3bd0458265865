"""Show1Pipeline: a prompt -> Show-1's 29-frame 576x320 video, through five stages.

    text (T5, once) -> keyframes 8x64x40 -> interpolation 29x64x40 -> first frame 256x160
      -> video super-resolution 1 29x256x160 -> video super-resolution 2 (latent) 29x576x320
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import fused_attention
from .frames import to_uint8_frames
from .manifest import check_manifest_sizes
from .loading import component_class, load_diffusers_model, load_scheduler, load_transformers_model
from .progress import StepLog
from .settings import Show1Settings
from .stages import generate_keyframes, interpolate_keyframes, refine_video, upscale_first_frame, upscale_video
from .stages.video_superres import window_starts
from .text import encode_clip, encode_t5
from .weights import COMPONENTS, required_files

# The networks each stage runs, in order. A plan with offloading moves exactly these to the device.
STAGE_NETWORKS = {
    "text": ("text_encoder", "sr2_text_encoder"),
    "keyframes": ("keyframes_unet",),
    "interpolation": ("interpolation_unet",),
    "first_frame": ("first_frame_unet",),
    "sr1": ("sr1_unet",),
    "sr2": ("sr2_unet", "sr2_vae"),
}
STAGE_NAMES = tuple(STAGE_NETWORKS)


@dataclass(frozen=True)
class ExecutionPlan:
    """Where the networks wait and how the work is batched: never what is computed.

    offload: networks wait on the CPU and visit the device only for their own stage, so the peak
        memory is that of the largest stage rather than of all of them (for 24 GB GPUs).
    interpolation_batch: interpolation segments per UNet call; None runs all 7 in one batch.
    """

    offload: bool = False
    interpolation_batch: Optional[int] = None

    def home(self, device):
        """Where the networks wait between stages."""
        return "cpu" if self.offload else device


RESIDENT = ExecutionPlan()
LOW_MEMORY = ExecutionPlan(offload=True)
# How the reference runs: every stage offloaded to the CPU between uses, one segment per call.
REFERENCE_PLAN = ExecutionPlan(offload=True, interpolation_batch=1)


@dataclass
class Show1Output:
    """`frames`: uint8 [F, H, W, 3] of the last stage run. The intermediate stages as float
    tensors in [-1, 1], [1, 3, F, H, W] (None when not run), and seconds per stage."""

    frames: np.ndarray
    keyframes: Optional[torch.Tensor] = None
    interpolated: Optional[torch.Tensor] = None
    first_frame: Optional[torch.Tensor] = None
    sr1: Optional[torch.Tensor] = None
    timings: dict = field(default_factory=dict)


class NonFiniteOutputError(RuntimeError):
    """A stage produced NaN or infinity: a numerical failure, never a usable video."""


def check_finite(stage, output):
    """Raises NonFiniteOutputError when a stage's output is not finite. One device sync per stage."""
    if not bool(torch.isfinite(output).all()):
        raise NonFiniteOutputError(
            f"Stage '{stage}' produced non-finite values (NaN or infinity) in {output.dtype} on {output.device}. "
            "This is a numerical problem in the model's computation, not in the prompt; no video was written."
        )
    return output


def load_component(weights_dir, key, device, dtype=None):
    """One component; a network in `dtype`, or in its serving dtype (show1.weights) when None."""
    component = COMPONENTS[key]
    dtype = dtype or component.serving_dtype
    folder = component.path(weights_dir)
    cls = component_class(weights_dir, component)
    if component.folder.endswith("scheduler"):
        return load_scheduler(cls, folder)
    if component.folder == "tokenizer":
        return cls.from_pretrained(folder)
    if component.weights_stem == "model":
        return load_transformers_model(cls, folder, dtype, device)
    return load_diffusers_model(cls, folder, dtype=dtype, device=device)


class Show1Pipeline:
    def __init__(self, components: dict, device, dtype, plan: ExecutionPlan = RESIDENT):
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.plan = plan
        self._progress_config = {}

    @classmethod
    def from_pretrained(cls, weights_dir, device="cpu", dtype=torch.float32, low_memory=False):
        """Loads every stage from a weights folder laid out as the five Hub repos (see show1.weights).
        dtype: every network's precision, or None for each network's serving dtype (the GPU's).
        low_memory keeps the networks on the CPU between their uses (see ExecutionPlan)."""
        check_manifest_sizes(weights_dir)
        required_files(weights_dir)
        plan = LOW_MEMORY if low_memory else RESIDENT
        components = {key: load_component(weights_dir, key, plan.home(device), dtype) for key in COMPONENTS}
        return cls(components, device, dtype, plan)

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the per-stage progress bars, e.g. disable=True; or log=True for plain
        log lines instead of bars (show1.progress.StepLog: every 10% of a stage's steps or every
        5 s), which is what a server's logs need."""
        self._progress_config.update(kwargs)

    def _progress(self, desc, windows=1):
        """The progress wrapper of a stage's steps loop; a stage that runs the loop once per window
        (sr1) says how many, so that each log line names its window."""
        config = dict(self._progress_config)
        if config.pop("log", False) and not config.get("disable"):
            return StepLog(desc, passes=windows, pass_name="window")
        return lambda steps: tqdm(steps, desc=desc, **config)

    @contextmanager
    def _networks_on_device(self, stage):
        """With offloading, the stage's networks visit the device for the stage only."""
        networks = [self.components[key] for key in STAGE_NETWORKS[stage]] if self.plan.offload else []
        for network in networks:
            network.to(self.device)
        try:
            yield
        finally:
            for network in networks:
                network.to("cpu")

    @contextmanager
    def _timed(self, stage, timings, on_stage_end):
        start = time.perf_counter()
        # The text encoders attend over 77 tokens, where any kernel fits in memory, and T5's
        # position bias is a mask that not every fused kernel takes: only the image stages are held
        # to fused attention.
        attention = nullcontext() if stage == "text" else fused_attention(self.device)
        with self._networks_on_device(stage), attention:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - start
        if on_stage_end is not None:
            on_stage_end(stage, timings[stage])

    @torch.no_grad()
    def __call__(self, prompt: str, on_stage_end: Optional[Callable[[str, float], None]] = None, **settings):
        """Generates a video. Keyword settings and their defaults: show1.settings.Show1Settings;
        `output_stage` stops early. on_stage_end(stage, seconds) is called after each stage.
        Raises NonFiniteOutputError, naming the stage, when a stage's output is not finite."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: describe the video to generate.")
        s = Show1Settings(**settings)
        c, timings = self.components, {}

        def stage(name):
            return self._timed(name, timings, on_stage_end)

        with stage("text"):
            text = encode_t5(c["tokenizer"], c["text_encoder"], prompt)
            if s.output_stage == "full":
                clip_text = encode_clip(c["sr2_tokenizer"], c["sr2_text_encoder"], prompt, s.negative_prompt)
        with stage("keyframes"):
            keyframes = check_finite("keyframes", generate_keyframes(
                c["keyframes_unet"], c["keyframes_scheduler"], text,
                steps=s.keyframe_steps, guidance=s.keyframe_guidance, seed=s.seed, progress=self._progress("keyframes"),
            ))
        result = Show1Output(frames=None, keyframes=keyframes, timings=timings)
        if s.output_stage == "keyframes":
            return self._finish(result, keyframes)

        with stage("interpolation"):
            result.interpolated = check_finite("interpolation", interpolate_keyframes(
                c["interpolation_unet"], c["interpolation_scheduler"], text, keyframes,
                steps=s.interpolation_steps, guidance=s.interpolation_guidance, seed=s.seed,
                segments_per_batch=self.plan.interpolation_batch, progress=self._progress("interpolation"),
            ))
        if s.output_stage == "interpolated":
            return self._finish(result, result.interpolated)

        with stage("first_frame"):
            result.first_frame = check_finite("first_frame", upscale_first_frame(
                c["first_frame_unet"], c["first_frame_scheduler"], c["first_frame_noising_scheduler"], text,
                result.interpolated[:, :, :1], steps=s.first_frame_steps, guidance=s.first_frame_guidance,
                noise_level=s.first_frame_noise_level, seed=s.seed, progress=self._progress("first frame"),
            ))
        with stage("sr1"):
            result.sr1 = check_finite("sr1", upscale_video(
                c["sr1_unet"], c["sr1_scheduler"], c["sr1_noising_scheduler"], text, result.interpolated,
                result.first_frame, steps=s.sr1_steps, guidance=s.sr1_guidance, noise_level=s.sr1_noise_level,
                seed=s.seed, progress=self._progress(
                    "super-resolution 1", windows=len(window_starts(result.interpolated.shape[2]))
                ),
            ))
        if s.output_stage == "sr1":
            return self._finish(result, result.sr1)

        with stage("sr2"):
            video = check_finite("sr2", refine_video(
                c["sr2_unet"], c["sr2_vae"], c["sr2_scheduler"], clip_text, result.sr1,
                steps=s.sr2_steps, strength=s.sr2_strength, guidance=s.sr2_guidance, seed=s.seed,
                progress=self._progress("super-resolution 2"),
            ))
        return self._finish(result, video)

    @staticmethod
    def _finish(result, video):
        result.frames = to_uint8_frames(video)
        return result
