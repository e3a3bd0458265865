"""Seconds per denoising step of each stage, measured inside a real run of the cascade, and the
seconds per video they predict at the default settings.

The pipeline tells its public step callbacks before and after every denoising step
(callback_on_step_begin, callback_on_step_end; show1.progress). StepClock is both: it times each
step (a UNet call on the guidance batch plus the scheduler step) between two device
synchronisations. The pipeline reports the end of each stage (on_stage_end), which closes that
stage's account. A short run (a few steps per stage) then tells, per stage, the seconds of one
steady step and the seconds of everything else (text encoding, conditions, VAE, moving
networks): the one-off work.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from show1.progress import steps_per_loop
from show1.settings import Show1Settings


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StageSteps:
    """What one stage did in a run: its denoising loops (the seconds of each step) and its time."""

    seconds: float
    loops: list = field(default_factory=list)  # one list of step seconds per guided_denoise call

    @property
    def steps(self) -> int:
        return sum(len(loop) for loop in self.loops)

    @property
    def step_seconds(self) -> float:
        """The median steady step; the first step of each loop is left out when a loop has more
        (it pays the loop's first-use costs), and kept when it is all there is."""
        steady = [s for loop in self.loops for s in loop[1:]] or [s for loop in self.loops for s in loop]
        return statistics.median(steady) if steady else 0.0

    @property
    def one_off_seconds(self) -> float:
        """The stage's time outside its steady steps."""
        return max(0.0, self.seconds - self.steps * self.step_seconds)


class StepClock:
    """Times a pipeline's denoising steps: pass `step_begins` as callback_on_step_begin,
    `step_ends` as callback_on_step_end and `end_stage` as on_stage_end."""

    def __init__(self, device):
        self.device = device
        self.stages = {}
        self._loops = []
        self._step_start = None

    def step_begins(self, pipe, progress):
        if progress.step == 1:
            self._loops.append([])
        synchronize(self.device)  # the work queued before the step is not the step's
        self._step_start = time.perf_counter()

    def step_ends(self, pipe, progress):
        synchronize(self.device)
        self._loops[-1].append(time.perf_counter() - self._step_start)

    def end_stage(self, stage, seconds):
        self.stages[stage] = StageSteps(seconds, self._loops)
        self._loops = []


def default_steps_per_loop(settings=Show1Settings()) -> dict:
    """Denoising steps of one loop of each stage at `settings` (default: the reference defaults)."""
    return steps_per_loop(settings)


def short_run_settings(steps) -> dict:
    """Settings that run `steps` denoising steps per loop in every stage."""
    strength = Show1Settings().sr2_strength
    sr2_steps = next(n for n in range(steps, 4 * steps + 2) if int(n * strength) == steps)
    return dict(keyframe_steps=steps, interpolation_steps=steps, first_frame_steps=steps, sr1_steps=steps,
                sr2_steps=sr2_steps)


@dataclass
class StageEstimate:
    """One stage at the default settings, from a short run."""

    stage: str
    steps_per_video: int
    step_seconds: float
    one_off_seconds: float

    @property
    def seconds(self) -> float:
        return self.steps_per_video * self.step_seconds + self.one_off_seconds


def estimate_video(stages: dict, steps_per_loop=None) -> dict:
    """{stage: StageEstimate} at the default settings. The number of loops per stage (sr1 windows,
    interpolation batches) does not depend on the step counts, so the short run's count holds."""
    steps_per_loop = steps_per_loop or default_steps_per_loop()
    return {
        stage: StageEstimate(stage, len(run.loops) * steps_per_loop.get(stage, 0), run.step_seconds, run.one_off_seconds)
        for stage, run in stages.items()
    }
