"""The prediction's progress (show1.progress): one bar over the whole prediction, its steps weighted
by their cost, the public step callbacks it is built on, and the log lines that Replicate reads."""

import re

import pytest

from bench.gpu_check import run_cascade
from bench.step_clock import short_run_settings
from bench.step_flops import step_gflops
from show1 import Show1Pipeline
from show1.failures import failed_stage
from show1.progress import (
    STEP_GFLOPS, PredictionProgress, ProgressBar, ProgressLog, StepProgress, planned_work, progress_line,
)
from show1.settings import Show1Settings

# replicate-javascript's parseProgressFromLogs: the last log line that matches is the progress.
REPLICATE_PROGRESS = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)")
# A few steps in each stage up to sr1, which runs them in each of its 4 windows. (sr2 is left out:
# on the tiny weights it takes minutes on this CPU; the Cog server tests count its steps.) The
# pipeline tests run on small keyframes (conftest.small_keyframes): progress does not depend on the
# frame size.
FEW_STEPS = {"keyframe_steps": 3, "interpolation_steps": 2, "first_frame_steps": 1, "sr1_steps": 1, "output_stage": "sr1"}


def replicate_progress(logs: str) -> list:
    """(percent, current, total) of every log line that Replicate reads as progress, in order."""
    matches = [REPLICATE_PROGRESS.match(line) for line in logs.split("\n")]
    return [tuple(int(group) for group in m.groups()) for m in matches if m]


def assert_one_bar_to_the_end(logs: str):
    """The logs' progress never goes back and ends at 100% with current == total."""
    progress = replicate_progress(logs)
    assert progress, "no line reads as progress"
    assert [p for p, _, _ in progress] == sorted(p for p, _, _ in progress), "the percentage went back"
    assert [c for _, c, _ in progress] == sorted(c for _, c, _ in progress)
    percent, current, total = progress[-1]
    assert percent == 100 and current == total


class FakeClock:
    """A clock that reads `now`, moved by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(progress: PredictionProgress, clock: FakeClock, seconds_per_gflop: float):
    """Walks every loop of every planned stage as the stages do, the clock moving by each step's cost."""
    for stage, work in progress.work.items():
        steps = progress.steps(stage)
        for _ in range(work.loops):
            for _ in steps(range(work.steps)):
                clock.now += work.step_work * seconds_per_gflop


def logged_lines(settings=Show1Settings(), seconds_per_gflop=1e-6) -> list:
    """The lines ProgressLog writes over a simulated prediction at `settings`."""
    lines, clock = [], FakeClock()
    log = ProgressLog(clock=clock, write=lines.append)
    simulate(PredictionProgress(planned_work(settings), on_step_end=[lambda p: log(None, p)]), clock, seconds_per_gflop)
    return lines


# --- the weights -------------------------------------------------------------------------------


def test_the_step_costs_are_the_flops_counted_at_the_published_sizes():
    # The bar needs the stages' relative costs, not exact counts: a change of a few percent (say,
    # how attention heads are padded) would not move it noticeably.
    counted = step_gflops()
    assert counted.keys() == STEP_GFLOPS.keys()
    for stage, gflops in counted.items():
        assert gflops == pytest.approx(STEP_GFLOPS[stage], rel=0.02), f"refresh STEP_GFLOPS: {counted}"


def test_a_step_weighs_its_cost_so_an_sr2_step_counts_more_than_a_keyframe_step():
    work = planned_work(Show1Settings())
    assert work["sr2"].step_work > work["keyframes"].step_work
    by_cost = sorted(work, key=STEP_GFLOPS.get)
    assert by_cost == sorted(work, key=lambda stage: work[stage].step_work), "the weights are monotone in cost"
    # sr1 runs its 125 steps in each of its 4 windows, sr2 the last 80% of its 50.
    assert {stage: (w.loops, w.steps) for stage, w in work.items()} == {
        "keyframes": (1, 75), "interpolation": (1, 75), "first_frame": (1, 70), "sr1": (4, 125), "sr2": (1, 40),
    }


def test_only_the_stages_that_run_count_and_a_plan_splitting_interpolation_does_not_change_the_total():
    assert list(planned_work(Show1Settings(output_stage="keyframes"))) == ["keyframes"]
    assert list(planned_work(Show1Settings(output_stage="sr1"))) == ["keyframes", "interpolation", "first_frame", "sr1"]
    whole, one_segment_per_call = planned_work(Show1Settings()), planned_work(Show1Settings(), interpolation_batch=1)
    assert one_segment_per_call["interpolation"].loops == 7
    assert one_segment_per_call["interpolation"].work == pytest.approx(whole["interpolation"].work, rel=1e-3)


# --- the log lines -------------------------------------------------------------------------------


def test_a_line_reads_as_replicate_progress_and_names_the_stage_and_step():
    progress = StepProgress("sr1", step=40, steps=125, loop=2, loops=4, work_done=37, work_total=100)
    line = progress_line(progress, elapsed=21.3)
    assert line == " 37%|███▋      | 37/100 [00:21<00:36] sr1 window 2/4, step 40/125"
    assert replicate_progress(line) == [(37, 37, 100)]
    single = StepProgress("keyframes", step=8, steps=75, loop=1, loops=1, work_done=0, work_total=100)
    assert progress_line(single, elapsed=0.0) == "  0%|          | 0/100 [00:00<?] keyframes, step 8/75"


def test_a_prediction_logs_a_line_every_two_percent_and_ends_at_100():
    lines = logged_lines()
    assert all("\r" not in line and "\n" not in line for line in lines)
    assert_one_bar_to_the_end("\n".join(lines))
    percents = [percent for percent, _, _ in replicate_progress("\n".join(lines))]
    # One line per multiple of 2% (the clock is fast: no line for time alone), and the last.
    assert percents == list(range(2, 101, 2))
    assert lines[-1].endswith("sr2, step 40/40")


def test_slow_progress_gets_a_line_at_least_every_ten_seconds():
    # At 0.1 ms per GFLOP an sr1 step takes 2.6 s and moves the bar by 0.13%: 2% takes 39 s, so
    # the lines come from the clock. A line comes with the first step that ends 10 s after the last.
    lines = logged_lines(seconds_per_gflop=1e-4)
    elapsed = [0] + [seconds(line) for line in lines]
    longest_step = 1e-4 * max(STEP_GFLOPS.values())
    assert max(b - a for a, b in zip(elapsed, elapsed[1:])) <= 10 + longest_step + 1  # lines show whole seconds
    assert_one_bar_to_the_end("\n".join(lines))
    # A step longer than 10 s gets a line of its own.
    lines = logged_lines(Show1Settings(output_stage="keyframes"), seconds_per_gflop=1e-3)
    assert len(lines) == 75


def seconds(line) -> int:
    """The elapsed seconds of a progress line ('[MM:SS<...')."""
    minutes, secs = re.search(r"\[(\d+):(\d+)<", line).groups()
    return 60 * int(minutes) + int(secs)


# --- the pipeline's callbacks --------------------------------------------------------------------


def test_the_callback_is_called_once_per_step_with_the_right_counts(tiny_pipeline, small_keyframes):
    begun, ended = [], []
    tiny_pipeline("a red panda", seed=1, callback_on_step_begin=lambda pipe, p: begun.append(p),
                  callback_on_step_end=lambda pipe, p: ended.append((pipe, p)), **FEW_STEPS)
    assert all(pipe is tiny_pipeline for pipe, _ in ended)
    ended = [p for _, p in ended]
    expected = (
        [("keyframes", 1, 1, step, 3) for step in (1, 2, 3)]
        + [("interpolation", 1, 1, step, 2) for step in (1, 2)]
        + [("first_frame", 1, 1, 1, 1)]
        + [("sr1", window, 4, 1, 1) for window in (1, 2, 3, 4)]
    )
    assert [(p.stage, p.loop, p.loops, p.step, p.steps) for p in ended] == expected
    # The work done grows by each step's cost and reaches the total with the last step.
    steps = {"keyframes": 3, "interpolation": 2, "first_frame": 1, "sr1": 4}
    total = sum(count * STEP_GFLOPS[stage] for stage, count in steps.items())
    assert {p.work_total for p in ended} == {total}
    assert [b.work_done - a.work_done for a, b in zip(ended, ended[1:])] == [STEP_GFLOPS[p.stage] for p in ended[1:]]
    assert ended[-1].work_done == total and ended[-1].finished and ended[-1].percent == 100
    # Each step is begun before it ends: the same step, with the work before it.
    assert [(p.stage, p.loop, p.step) for p in begun] == [(p.stage, p.loop, p.step) for p in ended]
    assert [p.work_done for p in begun] == [0] + [p.work_done for p in ended[:-1]]


def test_an_exception_in_the_callback_stops_the_prediction_cleanly(tiny_pipeline, small_keyframes):
    class Stop(Exception):
        pass

    told = []

    def stop_after_the_first_interpolation_step(pipe, progress):
        told.append((progress.stage, progress.step))
        if progress.stage == "interpolation":
            raise Stop

    finished = []
    with pytest.raises(Stop) as stopped:
        tiny_pipeline("a red panda", seed=1, callback_on_step_end=stop_after_the_first_interpolation_step,
                      on_stage_end=lambda stage, seconds: finished.append(stage), **FEW_STEPS)
    assert told == [("keyframes", 1), ("keyframes", 2), ("keyframes", 3), ("interpolation", 1)], \
        "no step after the one whose callback raised"
    assert finished == ["text", "keyframes"]
    assert failed_stage(stopped.value) == "interpolation"
    # The pipeline is as good as before.
    output = tiny_pipeline("a red panda", seed=1, output_stage="keyframes", keyframe_steps=1)
    assert output.frames.shape == (8, *small_keyframes, 3)


def test_the_library_bar_is_one_tqdm_bar_to_100_percent_closed_however_the_prediction_ends(
    tiny_pipeline, small_keyframes, capsys, monkeypatch
):
    pipe = Show1Pipeline(tiny_pipeline.components, "cpu")
    pipe.set_progress_bar_config(ncols=100)
    pipe("a red panda", seed=1, output_stage="keyframes", keyframe_steps=2)
    bar = capsys.readouterr().err
    assert "100%|" in bar and "100/100" in bar and "keyframes, step 2/2" in bar

    bars = []

    class ClosedBar(ProgressBar):
        def close(self):
            bars.append(self.bar.n)
            super().close()

    def fail(pipe, progress):
        raise RuntimeError("stop")

    monkeypatch.setattr("show1.pipeline.ProgressBar", ClosedBar)
    with pytest.raises(RuntimeError, match="stop"):
        pipe("a red panda", seed=1, output_stage="keyframes", keyframe_steps=4, callback_on_step_end=fail)
    assert bars == [25], "the bar was closed where the prediction stopped"

    capsys.readouterr()
    pipe.set_progress_bar_config(disable=True)
    pipe("a red panda", seed=1, output_stage="keyframes", keyframe_steps=2)
    assert capsys.readouterr() == ("", "")


# --- gpu-check -----------------------------------------------------------------------------------


def test_gpu_check_times_every_step_through_the_public_callbacks(tiny_pipeline, small_keyframes):
    # The reference plan runs interpolation one segment per call: 7 loops, each timed on its own.
    settings = {**short_run_settings(1), "output_stage": "interpolated"}
    run = run_cascade("reference", tiny_pipeline.components, "cpu", settings)
    assert run.error is None
    loops = {stage: [len(loop) for loop in steps.loops] for stage, steps in run.stages.items()}
    assert loops == {"text": [], "keyframes": [1], "interpolation": [1] * 7}
    assert all(seconds > 0 for steps in run.stages.values() for loop in steps.loops for seconds in loop)
