"""Progress of a whole prediction: one bar from 0 to 100% over every denoising step that will run,
and the public per-step callbacks it is built on.

The stages spend their time in denoising steps (show1.sampling.guided_denoise), but their steps
cost very different amounts: one sr2 step (29 frames of 72x40 latents) is about five keyframe
steps (8 frames at 64x40). So a step's share of the bar is its UNet call's cost at the stage's
shapes, in GFLOPs (STEP_GFLOPS), and only the stages that run (`output_stage`) count: the
percentage and its time estimate then move about evenly in time.

The pipeline tells its callbacks before and after every step (PredictionProgress), with a
StepProgress. Two callbacks are provided: ProgressBar, the tqdm bar of library users, and
ProgressLog, plain log lines for a server's logs, in the format that Replicate reads progress from
(the last line matching `^\\s*(\\d+)%\\s*\\|.+?\\|\\s*(\\d+)/(\\d+)`, as replicate-javascript's
parseProgressFromLogs does):

     37%|███▋      | 37/100 [00:21<00:36] sr1 window 2/4, step 40/125
"""

import itertools
import math
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from .components import STAGES
from .settings import Show1Settings
from .stages.interpolation import SEGMENT_FRAMES
from .stages.keyframes import NUM_KEYFRAMES
from .stages.sr1 import window_starts

# GFLOPs of one denoising step's UNet call at the published size and the stage's shapes: the
# classifier-free guidance batch of 2, interpolation's 7 segments in one call, one sr1 window.
# Counted by bench/step_flops.py (torch.utils.flop_counter on fake tensors, attention included);
# tests/test_progress.py checks that they are still what it counts.
STEP_GFLOPS = {"keyframes": 10471, "interpolation": 45836, "first_frame": 3852, "sr1": 26169, "sr2": 53011}

SEGMENTS = NUM_KEYFRAMES - 1  # interpolation segments, one between each pair of keyframes
VIDEO_FRAMES = (SEGMENT_FRAMES - 1) * SEGMENTS + 1  # 29: neighbouring segments share a keyframe
# What a stage that runs its steps loop several times calls one loop.
LOOP_NAMES = {"interpolation": "batch", "sr1": "window"}


def steps_per_loop(settings: Show1Settings) -> dict:
    """Denoising steps of one loop of each stage at `settings`. sr2 runs the last `strength` of its
    schedule; sr1 runs sr1_steps per window."""
    return {
        "keyframes": settings.keyframe_steps,
        "interpolation": settings.interpolation_steps,
        "first_frame": settings.first_frame_steps,
        "sr1": settings.sr1_steps,
        "sr2": int(settings.sr2_steps * settings.sr2_strength),
    }


def loops_per_stage(interpolation_batch=None) -> dict:
    """How many times each stage runs its steps loop: sr1 once per window, interpolation once per
    batch of `interpolation_batch` segments (None: all in one), the others once."""
    segments_per_batch = interpolation_batch or SEGMENTS
    return {
        "keyframes": 1,
        "interpolation": math.ceil(SEGMENTS / segments_per_batch),
        "first_frame": 1,
        "sr1": len(window_starts(VIDEO_FRAMES)),
        "sr2": 1,
    }


@dataclass(frozen=True)
class StageWork:
    """A stage's denoising steps in a prediction: `loops` loops of `steps` steps, each step
    `step_work` units of work (GFLOPs)."""

    stage: str
    loops: int
    steps: int
    step_work: int

    @property
    def work(self) -> int:
        return self.loops * self.steps * self.step_work


def step_work(stage, loops) -> int:
    """GFLOPs of one step of one of the stage's `loops` loops. Each sr1 window makes a whole call;
    interpolation's batches share the call of all 7 segments, equally (exact in every plan: one
    batch of 7, or 7 of one)."""
    if stage == "interpolation":
        return max(1, round(STEP_GFLOPS[stage] / loops))
    return STEP_GFLOPS[stage]


def planned_work(settings: Show1Settings, interpolation_batch=None) -> dict:
    """{stage: StageWork} of the denoising stages that run at `settings`, in order."""
    last = STAGES.index(settings.last_stage)
    steps, loops = steps_per_loop(settings), loops_per_stage(interpolation_batch)
    return {
        stage: StageWork(stage, loops[stage], steps[stage], step_work(stage, loops[stage]))
        for stage in STAGES[: last + 1]
        if stage in STEP_GFLOPS
    }


@dataclass(frozen=True)
class StepProgress:
    """Where a prediction is, as the step callbacks are told: around step `step` of `steps` in
    loop `loop` of `loops` of stage `stage` (sr1 runs one loop per window, interpolation one per
    batch of segments). work_done of work_total counts the steps that have ended, in GFLOPs, over
    the whole prediction: its fraction is the prediction's progress."""

    stage: str
    step: int
    steps: int
    loop: int
    loops: int
    work_done: int
    work_total: int

    @property
    def fraction(self) -> float:
        return self.work_done / self.work_total

    @property
    def percent(self) -> int:
        """Whole percent done, rounded down: 100 only once every step has ended."""
        return 100 * self.work_done // self.work_total

    @property
    def finished(self) -> bool:
        return self.work_done == self.work_total

    @property
    def label(self) -> str:
        """'sr1 window 2/4, step 40/125', 'keyframes, step 8/75'."""
        loop = f" {LOOP_NAMES.get(self.stage, 'loop')} {self.loop}/{self.loops}" if self.loops > 1 else ""
        return f"{self.stage}{loop}, step {self.step}/{self.steps}"


class PredictionProgress:
    """Counts a prediction's denoising work and tells the callbacks around each step.

    on_step_begin and on_step_end: functions of a StepProgress, called before a step starts and
    after it has ended. An exception raised by one of them stops the loop, and so the prediction.
    """

    def __init__(self, work: dict, on_step_begin=(), on_step_end=()):
        self.work = work
        self.work_total = sum(stage.work for stage in work.values())
        self.work_done = 0
        self.on_step_begin = list(on_step_begin)
        self.on_step_end = list(on_step_end)

    def steps(self, stage):
        """The stage's `progress=` wrapper (show1.sampling.guided_denoise): called once per loop
        with the loop's steps, it passes them through and tells the callbacks around each."""
        loops = itertools.count(1)
        return lambda steps: self._told(self.work[stage], next(loops), steps)

    def _told(self, work: StageWork, loop: int, steps):
        count = len(steps)
        for number, step in enumerate(steps, start=1):
            self._tell(self.on_step_begin, work, loop, number, count)
            yield step  # the caller runs the step before asking for the next one
            self.work_done += work.step_work
            self._tell(self.on_step_end, work, loop, number, count)

    def _tell(self, callbacks, work, loop, step, steps):
        progress = StepProgress(work.stage, step, steps, loop, work.loops, self.work_done, self.work_total)
        for callback in callbacks:
            callback(progress)


def progress_line(progress: StepProgress, elapsed: float) -> str:
    """' 37%|███▋      | 37/100 [00:21<00:36] sr1 window 2/4, step 40/125': tqdm's bar, out of
    100, with the time left extrapolated from the work done so far."""
    rate = 100 * progress.fraction / elapsed if elapsed > 0 else None
    meter = tqdm.format_meter(
        n=progress.percent, total=100, elapsed=elapsed, rate=rate,
        bar_format="{percentage:3.0f}%|{bar:10}| {n}/{total} [{elapsed}<{remaining}]",
    )
    return f"{meter} {progress.label}"


class ProgressLog:
    """A step callback (`callback_on_step_end(pipe, progress)`) that prints the prediction's
    progress as log lines (progress_line): after every `every_percent` of the work, whenever
    `every_seconds` have passed since the last line (as a step ends: a step is not interrupted
    to log), and once at 100%. Each is a whole line,
    without the carriage returns a tqdm bar redraws with, so that logs stay readable and
    Replicate reads the last one as the prediction's progress. Elapsed time counts from the
    callback's creation: make one per prediction, just before it starts."""

    def __init__(self, every_percent=2, every_seconds=10.0, clock=time.monotonic, write=print):
        self.every_percent = every_percent
        self.every_seconds = every_seconds
        self.clock = clock
        self.write = write
        self.start = self.last_line_at = clock()
        self.last_percent = 0

    def __call__(self, pipe, progress: StepProgress):
        now = self.clock()
        next_percent = (self.last_percent // self.every_percent + 1) * self.every_percent
        if progress.finished or progress.percent >= next_percent or now - self.last_line_at >= self.every_seconds:
            self.write(progress_line(progress, now - self.start))
            self.last_percent, self.last_line_at = progress.percent, now


class ProgressBar:
    """A step callback that draws the prediction's progress as one tqdm bar, 0 to 100%, with the
    stage and step after it. `options` are tqdm's (Show1Pipeline.set_progress_bar_config)."""

    def __init__(self, **options):
        self.bar = tqdm(total=100, unit="%", **options)

    def __call__(self, pipe, progress: StepProgress):
        self.bar.set_postfix_str(progress.label, refresh=False)
        self.bar.update(progress.percent - self.bar.n)
        if progress.finished:
            self.close()

    def close(self):
        self.bar.close()
