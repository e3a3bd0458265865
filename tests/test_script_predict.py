"""script/predict end to end on the tiny weights (Cog's real HTTP server, no Docker): on a server it
starts and stops, and on one already running (--url)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from conftest import REFERENCE_WEIGHTS as TINY_WEIGHTS
from test_progress import assert_one_bar_to_the_end, replicate_progress
from test_video import decode_mp4

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "script" / "predict"
RUN_TIMEOUT = 600


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


def stages_reported(out: str) -> list:
    """The stages of script/predict's 'Seconds per stage: text 0.1, keyframes 2.0 (total 2.1)' line."""
    (line,) = [line for line in out.splitlines() if line.startswith("Seconds per stage: ")]
    per_stage, _total = re.fullmatch(r"Seconds per stage: (.*) \(total ([\d.]+)\)", line).groups()
    return [item.split()[0] for item in per_stage.split(", ")]


def progress_lines(out: str) -> list:
    return [line for line in out.splitlines() if replicate_progress(line)]


def assert_nothing_left(workdir: Path):
    tmpdir = workdir / "tmp"
    assert processes_started_with(tmpdir) == []
    # Neither the predictor's output folder nor script/predict's log folder.
    assert sorted(path.name for path in tmpdir.glob("show1-*")) == []


# --- script/predict ------------------------------------------------------------------------------


def assert_video_written(result, workdir: Path, shape: tuple, fps: int, stages: list) -> str:
    """script/predict succeeded: it wrote output.mp4 (the default name, in the folder it ran in) of
    `shape` at `fps`, reported seed 3, the stages that ran and the file, and its output holds one
    progress bar from 0 to 100%. Returns its standard output."""
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    frames, meta = decode_mp4(workdir / "output.mp4")
    assert frames.shape == shape
    assert (meta["codec"], meta["fps"]) == ("h264", fps)
    out = result.stdout
    assert "Seed: 3" in out.splitlines()
    assert stages_reported(out) == stages
    assert "Wrote output.mp4" in out
    assert_one_bar_to_the_end(out)
    return out


def keyframe_step_lines(out: str) -> list:
    return [line.split("] ", 1)[1] for line in progress_lines(out) if "keyframes" in line]


def test_a_prediction_on_its_own_server_echoes_its_progress_writes_the_video_and_cleans_up(tmp_path):
    result = run_script(
        ["-i", "prompt=a red panda eating bamboo", "-i", "seed=3", "-i", "output_stage=keyframes",
         "-i", "keyframe_steps=4", "--tiny"],
        tmp_path,
    )
    out = assert_video_written(result, tmp_path, (8, 40, 64, 3), 8, ["text", "keyframes"])
    assert "noise, not a picture" in out
    # The progress bar, echoed from the server's log one line at a time: each keyframe step (1/4
    # of the work) passes a multiple of 2%, so each has its line, which names it.
    assert keyframe_step_lines(out) == [f"keyframes, step {step}/4" for step in range(1, 5)]
    assert_nothing_left(tmp_path)


def test_a_prediction_on_a_running_server_writes_the_asked_video_and_leaves_the_server_ready(cog_server, tmp_path):
    """--url: the session's server (conftest.py), not started by script/predict. Also the server's
    answer for output_stage=sr1: 29 frames of 256x160 at the asked frame rate, stages up to sr1."""
    result = run_script(
        [
            "-i", "prompt=a red panda eating bamboo", "-i", "seed=3", "-i", "output_stage=sr1", "-i", "fps=12",
            "-i", "keyframe_steps=4", "-i", "interpolation_steps=1", "-i", "first_frame_steps=1",
            "-i", "sr1_steps=1", "--url", cog_server.url,
        ],
        tmp_path,
    )
    out = assert_video_written(result, tmp_path, (29, 160, 256, 3), 12,
                               ["text", "keyframes", "interpolation", "first_frame", "sr1"])
    # The prediction's log, printed when it has ended: each keyframe step (5.3% of the work) and
    # each sr1 window's step (13.3%) passes a multiple of 2%, so each has its line.
    assert keyframe_step_lines(out) == [f"keyframes, step {step}/4" for step in range(1, 5)]
    assert progress_lines(out)[-1].endswith("] sr1 window 4/4, step 1/1")
    assert_nothing_left(tmp_path)
    cog_server.wait_until_idle()
    assert cog_server.health()["status"] == "READY"


def test_a_refused_input_names_the_field_and_exits_non_zero(cog_server, tmp_path):
    result = run_script(["-i", "prompt=a cat", "-i", "keyframe_steps=0", "-i", "output_stage=keyframes",
                         "--url", cog_server.url], tmp_path)
    assert result.returncode != 0
    assert "keyframe_steps: 0 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "output.mp4").exists()
    assert_nothing_left(tmp_path)


def test_a_url_where_no_server_answers_is_named(tmp_path):
    from serving import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = run_script(["-i", "prompt=a cat", "--url", url], tmp_path)
    assert result.returncode != 0
    assert f"no Cog server answers at {url}" in result.stderr
    result = run_script(["-i", "prompt=a cat", "--url", url, "--tiny"], tmp_path)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


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

