"""script/predict end to end on the tiny weights (Cog's real HTTP server, no Docker), and the
progress lines (show1.progress) that the predictions log."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

from conftest import REFERENCE_WEIGHTS as TINY_WEIGHTS
from show1.components import Components
from show1.pipeline import Show1Pipeline
from show1.progress import StepLog
from test_video import decode_mp4

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "script" / "predict"
RUN_TIMEOUT = 600
PROGRESS_LINE = re.compile(r"(?P<label>.+): step (?P<done>\d+)/(?P<total>\d+) \(\d+%\), [\d.]+ s elapsed, about [\d.]+ s left")


def run_script(args, workdir: Path, **env) -> subprocess.CompletedProcess:
    """script/predict in workdir, with a TMPDIR of its own so that what it leaves can be seen."""
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(exist_ok=True)
    environment = dict(os.environ, TMPDIR=str(tmpdir), **env)
    return subprocess.run(
        [str(SCRIPT), *args], cwd=workdir, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def processes_started_with(tmpdir: Path) -> list:
    """Command lines of running processes whose environment has TMPDIR=tmpdir: the server and
    its worker, if script/predict left them behind."""
    marker = f"TMPDIR={tmpdir}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marker in environment and state != "Z":
            found.append(command.decode(errors="replace"))
    return found


def assert_nothing_left(workdir: Path):
    tmpdir = workdir / "tmp"
    assert processes_started_with(tmpdir) == []
    # Neither the predictor's output folder nor script/predict's log folder.
    assert sorted(path.name for path in tmpdir.glob("show1-*")) == []


def progress_lines(output: str, label: str) -> list:
    lines = [PROGRESS_LINE.fullmatch(line.strip()) for line in output.splitlines()]
    return [(int(m["done"]), int(m["total"])) for m in lines if m and m["label"] == label]


# --- script/predict ------------------------------------------------------------------------------


def test_a_prediction_on_the_tiny_weights_writes_the_asked_video_and_cleans_up(tmp_path):
    result = run_script(
        [
            "-i", "prompt=a red panda eating bamboo", "-i", "seed=3", "-i", "output_stage=sr1",
            "-i", "keyframe_steps=12", "-i", "interpolation_steps=1", "-i", "first_frame_steps=1",
            "-i", "sr1_steps=1", "--tiny",
        ],
        tmp_path,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr

    # The default name, in the folder the command ran in.
    frames, meta = decode_mp4(tmp_path / "output.mp4")
    assert frames.shape == (29, 160, 256, 3)
    assert (meta["codec"], meta["fps"]) == ("h264", 8)

    out = result.stdout
    assert "noise, not a picture" in out
    assert "Seed: 3" in out.splitlines()
    (stages,) = [line for line in out.splitlines() if line.startswith("Seconds per stage: ")]
    per_stage, _total = re.fullmatch(r"Seconds per stage: (.*) \(total ([\d.]+)\)", stages).groups()
    assert [item.split()[0] for item in per_stage.split(", ")] == ["text", "keyframes", "interpolation", "first_frame", "sr1"]
    assert "Wrote output.mp4" in out
    # Progress while a stage runs: every 10% of its 12 steps at least, not one line per step
    # (the time-based lines come on top only when a step takes more than 5 s).
    keyframe_steps = progress_lines(out, "keyframes")
    assert {done for done, _ in keyframe_steps} >= {2, 4, 6, 8, 10, 12}
    assert all(total == 12 for _, total in keyframe_steps)
    # sr1 names its windows.
    for window in range(1, 5):
        assert progress_lines(out, f"sr1 window {window}/4") == [(1, 1)]
    assert_nothing_left(tmp_path)


def test_a_refused_input_names_the_field_and_exits_non_zero(tmp_path):
    result = run_script(["-i", "prompt=a cat", "-i", "keyframe_steps=0", "-i", "output_stage=keyframes", "--tiny"], tmp_path)
    assert result.returncode != 0
    assert "keyframe_steps: 0 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "output.mp4").exists()
    assert_nothing_left(tmp_path)


def test_a_failed_setup_prints_its_logs_and_keeps_the_server_log(tmp_path):
    # One weight repo's index and nothing else: the predictor's setup fails, naming what is missing.
    weights = tmp_path / "weights"
    (weights / "show-1-base").mkdir(parents=True)
    shutil.copy(TINY_WEIGHTS / "show-1-base" / "model_index.json", weights / "show-1-base")
    result = run_script(["-i", "prompt=a cat"], tmp_path, SHOW1_WEIGHTS=str(weights))
    assert result.returncode != 0
    assert "setup failed (SETUP_FAILED)" in result.stderr and "script/download-weights" in result.stderr
    (log_line,) = [line for line in result.stderr.splitlines() if "the server's log is in" in line]
    server_log = Path(log_line.rsplit(" ", 1)[1])
    assert server_log.is_file() and server_log.parent.parent == tmp_path / "tmp"
    shutil.rmtree(server_log.parent)
    assert_nothing_left(tmp_path)


def test_without_weights_it_says_so_and_suggests_tiny(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    result = run_script(["-i", "prompt=a cat"], tmp_path, SHOW1_WEIGHTS=str(empty))
    assert result.returncode != 0
    assert f"No weights in {empty}" in result.stderr and "--tiny" in result.stderr
    assert "script/download-weights" in result.stderr


def test_an_input_without_a_value_is_refused_before_anything_starts(tmp_path):
    result = run_script(["-i", "prompt", "--tiny"], tmp_path)
    assert result.returncode != 0
    assert "-i takes NAME=VALUE" in result.stderr
    assert "Starting" not in result.stdout


# --- progress lines ------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def logged(steps, clock_step=0.001, **options):
    lines = []
    progress = StepLog("keyframes", clock=FakeClock(clock_step), write=lines.append, **options)
    assert list(progress(steps)) == list(steps), "the steps pass through unchanged"
    return lines


def test_a_line_every_tenth_of_the_steps_with_elapsed_and_remaining_seconds():
    lines = logged(range(75))
    steps_done = [int(PROGRESS_LINE.fullmatch(line)["done"]) for line in lines]
    assert steps_done == [8, 16, 24, 32, 40, 48, 56, 64, 72, 75]
    # The fake clock reads 0.001 s per step: 8 steps in 0.008 s, 67 left at that pace.
    assert lines[0] == "keyframes: step 8/75 (10%), 0.0 s elapsed, about 0.1 s left"


def test_slow_steps_get_a_line_every_interval_seconds():
    lines = logged(range(100), clock_step=2.0, interval=5.0)
    steps_done = [int(PROGRESS_LINE.fullmatch(line)["done"]) for line in lines]
    # 2 s per step: a line after every third step (6 s), and the 10% lines (which restart the count).
    assert steps_done[:6] == [3, 6, 9, 10, 13, 16]
    assert max(b - a for a, b in zip(steps_done, steps_done[1:])) == 3
    assert lines[2] == "keyframes: step 9/100 (9%), 18.0 s elapsed, about 182.0 s left"


def test_a_few_steps_get_a_line_each_and_none_are_lost():
    assert [int(PROGRESS_LINE.fullmatch(line)["done"]) for line in logged(range(3))] == [1, 2, 3]
    assert logged([]) == []


def test_repeated_loops_are_numbered_as_windows():
    lines = []
    progress = StepLog("sr1", passes=4, pass_name="window", clock=FakeClock(0.001), write=lines.append)
    for _ in range(4):
        list(progress(range(20)))
    labels = [PROGRESS_LINE.fullmatch(line)["label"] for line in lines]
    assert labels == [f"sr1 window {window}/4" for window in range(1, 5) for _ in range(10)]


def test_the_pipeline_logs_lines_instead_of_bars_when_asked(capsys):
    pipe = Show1Pipeline(Components({}), device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(log=True)
    list(pipe._progress("interpolation")(torch.arange(20)))
    assert progress_lines(capsys.readouterr().out, "interpolation") == [(done, 20) for done in range(2, 21, 2)]

    sr1 = pipe._progress("sr1", windows=4)
    for _ in range(4):
        list(sr1(range(3)))
    output = capsys.readouterr().out
    assert [progress_lines(output, f"sr1 window {window}/4") for window in range(1, 5)] == [
        [(1, 3), (2, 3), (3, 3)]
    ] * 4

    pipe.set_progress_bar_config(disable=True)
    list(pipe._progress("interpolation")(torch.arange(20)))
    assert capsys.readouterr() == ("", "")
