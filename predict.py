"""The Cog predictor: Show-1 text-to-video on Replicate, and `cog predict` on any GPU machine.

The Inputs below are written as literals on purpose: `cog build` reads this file without running
it, and only literal defaults, ranges and choices reach the schema that the web form and the API
are generated from. tests/test_predictor.py checks that they match show1.settings.
"""

import atexit
import gc
import os
import pathlib
import secrets
import shutil
import tempfile
import traceback
import uuid
import warnings
from typing import Optional

import torch
from cog import BasePredictor, CancelationException, Input, Path, current_scope

from show1 import Show1Pipeline
from show1.failures import failed_stage, is_out_of_memory
from show1.plans import GIB, HEADROOM_GIB, LOW_MEMORY, PREDICTED_PEAK_GIB, RESIDENT, ExecutionPlan, plan_for_device_memory
from show1.progress import ProgressLog
from show1.video import VIDEO_FORMATS, write_video

# Cog 0.23 warns that BasePredictor and predict() are deprecated in favour of BaseRunner and run().
# They stay: they are the names the Replicate web form and `cog predict` use today. Only these two
# warnings are silenced (Cog raises them when it loads this class, naming it "Predictor" or
# "predict.Predictor"); any other warning still shows.
KEPT_DEPRECATED_NAMES = (
    r"BasePredictor is deprecated; use BaseRunner instead",
    r"(predict\.)?Predictor\.predict\(\) is deprecated; use run\(\) instead",
)
for message in KEPT_DEPRECATED_NAMES:
    warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)

DEFAULT_WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"

OUT_OF_MEMORY_MESSAGE = (
    "The GPU ran out of memory {where}. The memory has been released and the next prediction will "
    "run normally. Memory use grows with the output size: try output_stage 'sr1' (256x160) or "
    "'interpolated' (64x40), or run on a GPU with more memory (README, 'Hardware': a 16 GB T4 is "
    "the smallest that runs 'full'). Other programs on the same GPU take memory too."
)


def weights_dir() -> pathlib.Path:
    """The weights folder: $SHOW1_WEIGHTS, or weights/ beside this file."""
    return pathlib.Path(os.environ.get("SHOW1_WEIGHTS") or DEFAULT_WEIGHTS_DIR)


def device_and_dtype():
    """On a GPU each network in its serving precision (None: float16, T5's `wo` layers float32);
    full precision on the CPU, where float16 is slow or unsupported."""
    if torch.cuda.is_available():
        return "cuda", None
    return "cpu", torch.float32


def execution_plan(device) -> ExecutionPlan:
    """SHOW1_LOW_MEMORY=1 or 0 forces the low-memory or the resident plan; otherwise a GPU gets the
    fastest plan that its memory holds (show1.plans.plan_for_device_memory), the CPU the resident one."""
    choice = os.environ.get("SHOW1_LOW_MEMORY", "").strip()
    if choice in ("0", "1"):
        return LOW_MEMORY if choice == "1" else RESIDENT
    if choice:
        raise ValueError(f"SHOW1_LOW_MEMORY must be 0 or 1, got {choice!r}")
    if device != "cuda":
        return RESIDENT
    return plan_for_device_memory(torch.cuda.get_device_properties(0).total_memory)


def describe_device(device) -> str:
    if device != "cuda":
        return device
    properties = torch.cuda.get_device_properties(0)
    return f"{properties.name} ({properties.total_memory / GIB:.1f} GiB)"


def random_seed() -> int:
    return secrets.randbelow(2**32)


def empty_folder(folder: pathlib.Path) -> None:
    """Delete everything in folder (recreated if a temp cleaner removed it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def new_output_path(folder: pathlib.Path, video_format: str) -> pathlib.Path:
    """A fresh file name. Never derived from the prompt: it is also the upload name, so it must be
    unique. The format is checked here too, so that no input text can ever become part of a path."""
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"output_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    return folder / f"show1-{uuid.uuid4().hex}.{video_format}"


def release_memory(error: BaseException) -> None:
    """Free the tensors that the interrupted pipeline left referenced from the traceback, then
    hand the cached GPU blocks back so the next prediction starts from a clean device."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_reporter(finished_stages: list):
    """The pipeline's on_stage_end callback: one log line and one metric per stage."""

    def report(stage: str, seconds: float) -> None:
        finished_stages.append(stage)
        print(f"Stage {stage} finished in {seconds:.1f} s")
        current_scope().record_metric(f"stage_seconds.{stage}", round(seconds, 3))

    return report


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load every stage once. A missing or incomplete weights folder fails here with a
        message naming what is missing and the command that fetches it."""
        device, dtype = device_and_dtype()
        plan = execution_plan(device)
        self.pipe = Show1Pipeline.from_pretrained(weights_dir(), device=device, dtype=dtype, low_memory=plan.offload is not None)
        # Cog's logs are lines, not a terminal: each prediction's progress is logged by a
        # show1.progress.ProgressLog instead of the pipeline's tqdm bar.
        self.pipe.set_progress_bar_config(disable=True)
        # Cog does not delete returned files, so each prediction clears this folder first, and the
        # worker removes it when it exits: the server shuts its worker down normally on SIGTERM
        # (docker stop, script/predict) or Ctrl-C, and that runs atexit handlers.
        self.output_dir = pathlib.Path(tempfile.mkdtemp(prefix="show1-outputs-"))
        atexit.register(shutil.rmtree, self.output_dir, ignore_errors=True)
        mode = "stages offloaded to the CPU between uses" if plan.offload is not None else "every stage resident"
        precision = dtype or "serving precision: float16"
        print(f"Show-1 loaded from {weights_dir()} on {describe_device(device)} ({precision}, plan {plan.name}: "
              f"{mode}, predicted peak {PREDICTED_PEAK_GIB[plan.name]:.1f} GiB + {HEADROOM_GIB} GiB headroom)")

    def predict(
        self,
        prompt: str = Input(
            description="What the video shows. Only its first 77 tokens (about 50 words) are read; a longer prompt is cut and the logs say how many tokens were dropped."
        ),
        negative_prompt: str = Input(
            default="low resolution, blur",
            description="What to steer away from (used by the final 576x320 refinement).",
        ),
        seed: Optional[int] = Input(
            default=None,
            ge=0,
            le=4294967295,
            description="Random seed for a reproducible video. Leave blank for a random one.",
        ),
        keyframe_steps: int = Input(
            default=75, ge=1, le=500, description="Denoising steps for the 8 keyframes (64x40)."
        ),
        interpolation_steps: int = Input(
            default=75, ge=1, le=500, description="Denoising steps for interpolating the keyframes to 29 frames."
        ),
        first_frame_steps: int = Input(
            default=70, ge=1, le=500, description="Denoising steps for upscaling the first frame to 256x160."
        ),
        sr1_steps: int = Input(
            default=125, ge=1, le=500, description="Denoising steps per 8-frame window of the 256x160 stage."
        ),
        sr2_steps: int = Input(
            default=50, ge=2, le=500, description="Scheduler steps of the 576x320 stage (80% of them run)."
        ),
        guidance_scale: float = Input(
            default=9.0,
            ge=1.0,
            le=30.0,
            description="How closely the keyframes follow the prompt (later stages keep their own values).",
        ),
        fps: int = Input(default=8, ge=1, le=30, description="Frames per second of the video."),
        output_format: str = Input(
            default="mp4", choices=["mp4", "gif"], description="mp4 (H.264, plays in browsers) or an animated gif."
        ),
        output_stage: str = Input(
            default="full",
            choices=["full", "sr1", "interpolated", "keyframes"],
            description="Stop early for a cheap preview: sr1 256x160, interpolated 64x40, keyframes 64x40 (8 frames).",
        ),
    ) -> Path:
        empty_folder(self.output_dir)
        if seed is None:
            seed = random_seed()
        print(f"Using seed: {seed}")
        current_scope().record_metric("seed", seed)
        finished_stages = []
        try:
            result = self.pipe(
                prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                keyframe_steps=keyframe_steps,
                # The one guidance input is the keyframe stage's (as the reference's guidance_scale);
                # the other stages keep the reference's own values (show1.settings).
                keyframe_guidance=guidance_scale,
                interpolation_steps=interpolation_steps,
                first_frame_steps=first_frame_steps,
                sr1_steps=sr1_steps,
                sr2_steps=sr2_steps,
                output_stage=output_stage,
                on_stage_end=stage_reporter(finished_stages),
                callback_on_step_end=ProgressLog(),
            )
            output_path = new_output_path(self.output_dir, output_format)
            return Path(write_video(result.frames, output_path, fps=fps, video_format=output_format))
        except CancelationException as error:
            print(f"Cancelled after stages: {', '.join(finished_stages) or 'none'}")
            empty_folder(self.output_dir)
            release_memory(error)
            raise
        except Exception as error:
            if is_out_of_memory(error):
                stage = failed_stage(error)
                # The allocator's own words (how much it tried to get, what was free) are for the
                # logs; the user gets what to change.
                print(f"GPU out of memory in stage {stage or 'unknown'}: {error}")
                release_memory(error)
                where = f"in stage {stage}" if stage else f"after stage {finished_stages[-1] if finished_stages else 'none'}"
                raise RuntimeError(OUT_OF_MEMORY_MESSAGE.format(where=where)) from None
            # A failed stage (NaN output, a bad setting) keeps its tensors alive through the
            # traceback: free them so the container serves the next prediction with a clean device.
            release_memory(error)
            raise
