"""Show1Pipeline: a prompt -> Show-1's 29-frame 576x320 video, through six stages (show1.components.STAGES).

    text (T5 and CLIP, once) -> keyframes 8x64x40 -> interpolation 29x64x40 -> first_frame 256x160
      -> sr1 (video super-resolution) 29x256x160 -> sr2 (latent video super-resolution) 29x576x320
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch

from .attention import fused_attention
from .components import COMPONENTS, STAGES, Components
from .failures import FiniteOutputs, check_finite, mark_failed_stage
from .frames import to_uint8_frames
from .models import UNet3DConditionModel
from .offload import WeightUploads
from .plans import LOW_MEMORY, RESIDENT, ExecutionPlan, Offload
from .progress import PredictionProgress, ProgressBar, StepProgress, planned_work
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


class Show1Pipeline:
    def __init__(self, components: Components, device, plan: ExecutionPlan = RESIDENT):
        """components: every stage's loaded components (each network already in its dtype);
        device: where the stages compute; plan: where the networks wait between their stages."""
        self.components = components
        self.device = torch.device(device)
        self.plan = plan
        if self.device.type == "cpu":
            for network in components.networks():
                if isinstance(network, UNet3DConditionModel):
                    network.feed_forward_frame_by_frame()
        self._progress_config = {}
        # The low-memory plan's host copies of the weights, made once, here (show1.offload).
        self._uploads = WeightUploads(components, self.device) if plan.offload is Offload.UPLOAD else None
        self._video_stages = STAGES  # the stages of the video being generated (set by __call__)

    @classmethod
    def from_pretrained(cls, weights_dir, device="cpu", dtype=torch.float32, low_memory=False):
        """Loads every stage from a weights folder laid out as the five Hub repos (show1.components).
        dtype: every network's precision, or None for each network's serving dtype (the GPU's).
        low_memory: the low-memory plan (LOW_MEMORY): the networks are loaded into CPU memory, copied
        once into host copies (pinned on a CUDA GPU) and uploaded for their own stage only."""
        check_manifest_sizes(weights_dir)
        required_files(weights_dir)
        plan = LOW_MEMORY if low_memory else RESIDENT
        loaded = {component: load_component(weights_dir, component, plan.idle_device(device), dtype)
                  for component in COMPONENTS}
        return cls(Components(loaded), device, plan)

    def set_progress_bar_config(self, **kwargs):
        """tqdm options of the prediction's progress bar (show1.progress.ProgressBar: one bar,
        0 to 100% of the denoising work), e.g. disable=True."""
        self._progress_config.update(kwargs)

    @contextmanager
    def _progress(self, settings, callback_on_step_begin, callback_on_step_end):
        """The prediction's step counter (show1.progress.PredictionProgress) over the stages that
        run at `settings`: around every denoising step it tells the bar, unless disabled, and the
        callbacks, each as callback(pipe, progress). The bar is closed however the prediction ends."""
        bar = None if self._progress_config.get("disable") else ProgressBar(**self._progress_config)

        def told(*callbacks):
            return [partial(callback, self) for callback in callbacks if callback is not None]

        try:
            yield PredictionProgress(planned_work(settings, self.plan.interpolation_batch),
                                     on_step_begin=told(callback_on_step_begin),
                                     on_step_end=told(bar, callback_on_step_end))
        finally:
            if bar is not None:
                bar.close()

    def _next_stage(self, stage):
        """The stage that runs after `stage` in the video being generated; None after its last."""
        following = self._video_stages[self._video_stages.index(stage) + 1:]
        return following[0] if following else None

    @contextmanager
    def _networks_on_device(self, stage):
        """With offloading, the stage's networks visit the device for the stage only (show1.plans.Offload):
        the low-memory plan uploads them from their host copies and drops them after the stage, and
        may upload the next stage's networks meanwhile; the reference's model offload moves them
        there and back."""
        if self._uploads is not None:
            with self._uploads.stage(stage, next_stage=self._next_stage(stage)):
                yield
            return
        networks = self.components.networks(stage) if self.plan.offload is Offload.MODEL else []
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
        attention, their outputs watched for non-finite values (the block gets the FiniteOutputs
        to check its result with), timed (the GPU's work included), and on_stage_end told. An
        exception leaving the block is marked with the stage (show1.failures.failed_stage)."""
        start = time.perf_counter()
        # The text encoders attend over 77 tokens, where any kernel fits in memory, and T5's
        # position bias is a mask that not every fused kernel takes: only the image stages are held
        # to fused attention.
        attention = nullcontext() if stage == "text" else fused_attention(self.device)
        try:
            with self._networks_on_device(stage), attention, FiniteOutputs(self.components.networks(stage)) as outputs:
                yield outputs
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        except BaseException as error:
            mark_failed_stage(error, stage)
            raise
        timings[stage] = time.perf_counter() - start
        if on_stage_end is not None:
            on_stage_end(stage, timings[stage])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        on_stage_end: Optional[Callable[[str, float], None]] = None,
        callback_on_step_end: Optional[Callable[["Show1Pipeline", StepProgress], None]] = None,
        callback_on_step_begin: Optional[Callable[["Show1Pipeline", StepProgress], None]] = None,
        **settings,
    ):
        """Generates a video. Keyword settings and their defaults: show1.settings.Show1Settings;
        `output_stage` stops early. on_stage_end(stage, seconds) is called after each stage.

        callback_on_step_end(pipe, progress) is called after every denoising step, as diffusers'
        callback of that name, with a show1.progress.StepProgress: the stage, the step and the
        number of steps (per loop: sr1 runs one loop per window), and the work done and in all
        (GFLOPs of the denoising steps of the stages that run; progress.fraction is the
        prediction's progress). Unlike diffusers' it gets neither the timestep nor the latents,
        and returns nothing. callback_on_step_begin(pipe, progress) is called before every step.
        An exception raised in either stops the prediction there (e.g. to cancel it); it leaves
        this call as it came, marked with its stage like any other.

        Raises NonFiniteOutputError, naming the stage, when a stage's output, or any output of
        its networks on the way, is not finite; any exception names the stage it was raised in
        (show1.failures.failed_stage)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: describe the video to generate.")
        s = Show1Settings(**settings)
        self._video_stages = STAGES[:STAGES.index(s.last_stage) + 1]
        with self._progress(s, callback_on_step_begin, callback_on_step_end) as progress:
            return self._generate(prompt, s, progress, on_stage_end)

    def _generate(self, prompt, s, progress, on_stage_end):
        """The stages of the video up to s.last_stage; their denoising steps tell `progress`."""
        result = Show1Output(timings={})

        def run(stage, run_stage, *args, **kwargs):
            """One denoising stage on its own components, its output checked to be finite."""
            with self._stage(stage, result.timings, on_stage_end) as outputs:
                stage_components = getattr(self.components, stage)
                output = run_stage(stage_components, *args, progress=progress.steps(stage), **kwargs)
                return check_finite(stage, output, outputs.flag)

        with self._stage("text", result.timings, on_stage_end) as outputs:
            states = text.run(self.components.text, prompt, s.negative_prompt, clip=s.last_stage == "sr2")
            check_finite("text", states.t5.cond, outputs.flag)

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
                         steps=s.sr1_steps, guidance=s.sr1_guidance, noise_level=s.sr1_noise_level, seed=s.seed)
        if s.last_stage == "sr1":
            return self._finish(result, result.sr1)

        video = run("sr2", sr2.run, states.clip, result.sr1,
                    steps=s.sr2_steps, strength=s.sr2_strength, guidance=s.sr2_guidance, seed=s.seed)
        return self._finish(result, video)

    @staticmethod
    def _finish(result, video):
        result.frames = to_uint8_frames(video)
        return result
