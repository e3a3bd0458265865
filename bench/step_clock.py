"""Seconds per denoising step of each stage, measured inside a real run of the cascade, and the
seconds per video they predict at the default settings.

Every stage denoises in `show1.sampling.guided_denoise`, which walks its timesteps through the
pipeline's progress callable. StepClock stands in for that callable: it times each step (a UNet
call on the guidance batch plus the scheduler step) between two device synchronisations. The
pipeline reports the end of each stage (on_stage_end), which closes that stage's account. A short
run (a few steps per stage) then tells, per stage, the seconds of one steady step and the seconds
of everything else (text encoding, conditions, VAE, moving networks): the one-off work.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

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
    """Replaces a pipeline's progress bars by step timing; pass `end_stage` as on_stage_end."""

    def __init__(self, device):
        self.device = device
        self.stages = {}
        self._loops = []

    def progress(self, description, **options):
        """The pipeline's progress factory (its options, such as sr1's window count, are for
        display): a function of a loop's steps that yields them, timed."""
        return self._timed_steps

    def _timed_steps(self, steps):
        loop = []
        self._loops.append(loop)
        for step in steps:
            synchronize(self.device)
            start = time.perf_counter()
            yield step
            synchronize(self.device)
            loop.append(time.perf_counter() - start)

    def end_stage(self, stage, seconds):
        self.stages[stage] = StageSteps(seconds, self._loops)
        self._loops = []


def default_steps_per_loop(settings=Show1Settings()) -> dict:
    """Denoising steps of one loop of each stage at `settings` (default: the reference defaults).
    sr2 runs the last `strength` of its schedule; sr1 runs sr1_steps per window."""
    return {
        "keyframes": settings.keyframe_steps,
        "interpolation": settings.interpolation_steps,
        "first_frame": settings.first_frame_steps,
        "sr1": settings.sr1_steps,
        "sr2": int(settings.sr2_steps * settings.sr2_strength),
    }


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
