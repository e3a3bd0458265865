"""Show1Pipeline: a prompt -> Show-1's 29-frame 576x320 video, through six stages (show1.components.STAGES).

    text (T5 and CLIP, once) -> keyframes 8x64x40 -> interpolation 29x64x40 -> first_frame 256x160
      -> sr1 (video super-resolution) 29x256x160 -> sr2 (latent video super-resolution) 29x576x320
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import fused_attention
from .components import COMPONENTS, Components
from .frames import to_uint8_frames
from .plans import LOW_MEMORY, RESIDENT, ExecutionPlan
from .progress import StepLog
from .settings import Show1Settings
from .stages import first_frame, interpolation, keyframes, sr1, sr2, text
from .weights.layout import required_files
from .weights.loading import load_component
from .weights.manifest import check_manifest_sizes


@dataclass
class Show1Output:
    """`frames`: uint8 [F, H, W, 3] of the last stage run. The earlier stages' outputs, named by
    stage id, as float tensors in [-1, 1], [1, 3, F, H, W] (None when not run), and seconds per stage."""

    frames: Optional[np.ndarray] = None
    keyframes: Optional[torch.Tensor] = None
    interpolation: Optional[torch.Tensor] = None
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


class Show1Pipeline:
    def __init__(self, components: Components, device, dtype, plan: ExecutionPlan = RESIDENT):
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.plan = plan
        self._progress_config = {}

    @classmethod
    def from_pretrained(cls, weights_dir, device="cpu", dtype=torch.float32, low_memory=False):
        """Loads every stage from a weights folder laid out as the five Hub repos (show1.components).
        dtype: every network's precision, or None for each network's serving dtype (the GPU's).
        low_memory keeps the networks on the CPU between their uses (see ExecutionPlan)."""
        check_manifest_sizes(weights_dir)
        required_files(weights_dir)
        plan = LOW_MEMORY if low_memory else RESIDENT
        loaded = {component: load_component(weights_dir, component, plan.home(device), dtype) for component in COMPONENTS}
        return cls(Components(loaded), device, dtype, plan)

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the per-stage progress bars, e.g. disable=True; or log=True for plain
        log lines instead of bars (show1.progress.StepLog: every 10% of a stage's steps or every
        5 s), which is what a server's logs need."""
        self._progress_config.update(kwargs)

    def _progress(self, stage, windows=1):
        """The progress wrapper of a stage's steps loop, labelled with the stage id; a stage that
        runs the loop once per window (sr1) says how many, so that each log line names its window."""
        config = dict(self._progress_config)
        if config.pop("log", False) and not config.get("disable"):
            return StepLog(stage, passes=windows, pass_name="window")
        return lambda steps: tqdm(steps, desc=stage, **config)

    @contextmanager
    def _networks_on_device(self, stage):
        """With offloading, the stage's networks visit the device for the stage only."""
        networks = self.components.networks(stage) if self.plan.offload else []
        for network in networks:
            network.to(self.device)
        try:
            yield
        finally:
            for network in networks:
                network.to("cpu")

    @contextmanager
    def _stage(self, stage, timings, on_stage_end):
        """Runs the block as `stage`: its networks on the device, image stages held to fused
        attention, timed (the GPU's work included), and on_stage_end told."""
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
        result = Show1Output(timings={})

        def run(stage, run_stage, *args, windows=1, **kwargs):
            """One denoising stage on its own components, its output checked to be finite."""
            with self._stage(stage, result.timings, on_stage_end):
                parts = getattr(self.components, stage)
                output = run_stage(parts, *args, progress=self._progress(stage, windows=windows), **kwargs)
                return check_finite(stage, output)

        with self._stage("text", result.timings, on_stage_end):
            states = text.run(self.components.text, prompt, s.negative_prompt, clip=s.last_stage == "sr2")

        result.keyframes = run("keyframes", keyframes.run, states.t5,
                               steps=s.keyframe_steps, guidance=s.keyframe_guidance, seed=s.seed)
        if s.last_stage == "keyframes":
            return self._finish(result, result.keyframes)

        result.interpolation = run("interpolation", interpolation.run, states.t5, result.keyframes,
                                   steps=s.interpolation_steps, guidance=s.interpolation_guidance, seed=s.seed,
                                   segments_per_batch=self.plan.interpolation_batch)
        if s.last_stage == "interpolation":
            return self._finish(result, result.interpolation)

        result.first_frame = run("first_frame", first_frame.run, states.t5, result.interpolation[:, :, :1],
                                 steps=s.first_frame_steps, guidance=s.first_frame_guidance,
                                 noise_level=s.first_frame_noise_level, seed=s.seed)
        result.sr1 = run("sr1", sr1.run, states.t5, result.interpolation, result.first_frame,
                         steps=s.sr1_steps, guidance=s.sr1_guidance, noise_level=s.sr1_noise_level, seed=s.seed,
                         windows=len(sr1.window_starts(result.interpolation.shape[2])))
        if s.last_stage == "sr1":
            return self._finish(result, result.sr1)

        video = run("sr2", sr2.run, states.clip, result.sr1,
                    steps=s.sr2_steps, strength=s.sr2_strength, guidance=s.sr2_guidance, seed=s.seed)
        return self._finish(result, video)

    @staticmethod
    def _finish(result, video):
        result.frames = to_uint8_frames(video)
        return result
