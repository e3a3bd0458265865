"""Shared test fixtures: the reference fixture files and the tiny weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
REFERENCE_WEIGHTS = REFERENCE / "weights"
EXPECTED = REFERENCE / "expected"

# One denoising step per stage (two for sr2, whose strength 0.8 must leave one): the whole tiny
# cascade in seconds, at the real model's sizes.
FAST = {"keyframe_steps": 1, "interpolation_steps": 1, "first_frame_steps": 1, "sr1_steps": 1, "sr2_steps": 2}

# Keyframes of SMALL_KEYFRAMES (height, width) instead of 40x64, for the tests of properties that do
# not depend on the frame size (where a video stops, determinism, failures, which context a stage
# runs in): every later stage works at the size of its input, so the whole cascade shrinks with
# them. Not square, so that a swapped height and width shows. The full-size shape of every stage
# is checked on the reference chain (test_pipeline.py) and against the reference's stage outputs
# (test_stages.py).
SMALL_KEYFRAMES = (8, 16)
# The final frames (height, width) of a whole video made from SMALL_KEYFRAMES: sr2 resizes to a fixed
# size (576x320 in the product), which would make every such video pay for a full-size sr2.
SMALL_FINAL_FRAMES = (32, 64)

# The reference outputs were computed with 2 CPU threads; other counts change the last bits.
torch.set_num_threads(2)


def keep_freed_memory():
    """Makes glibc's malloc keep the memory this process frees, for the next allocation.

    By default glibc maps every block over 32 MiB on its own and unmaps it when it is freed, so
    each of the tiny networks' full-size activations (84 MB for one of sr1's) starts on fresh pages
    that the kernel must fault in and zero. An sr1 forward took 5.4 s, with as much CPU time in the
    kernel as in PyTorch; 2.4 s with this. Only this process: the Cog servers the tests start run
    with glibc's defaults, as the image does, so that their memory tests see what a container's
    would. Results do not change (PyTorch aligns its blocks the same either way)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return  # not glibc: the tests run, only slower
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    mallopt(m_mmap_max, 0)  # every block from the heap, none mapped on its own
    mallopt(m_trim_threshold, 2**31 - 1)  # and the heap's free top kept up to 2 GiB


keep_freed_memory()


def recording(function, calls):
    """`function`, unchanged, appending each call's (args, kwargs, result) to `calls`: a test reads
    what a stage handed over, or computed on the way, from the run that made it."""

    def recorded(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    return recorded


def expected(name):
    """The reference implementation's arrays for one check (tests/fixtures/reference/README.md)."""
    with np.load(EXPECTED / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    """Tiny random weights in the published layout (read-only: copy before changing anything)."""
    return REFERENCE_WEIGHTS


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_weights):
    """The whole cascade on the tiny reference weights, CPU float32, progress bars off."""
    from show1 import Show1Pipeline

    pipe = Show1Pipeline.from_pretrained(tiny_weights, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_text():
    """The reference's T5 states for the fixture prompt (inputs of the pixel stages)."""
    from show1.stages.text import PromptEmbeddings

    t5 = expected("t5")
    return PromptEmbeddings(torch.from_numpy(t5["negative_prompt_embeds"]), torch.from_numpy(t5["prompt_embeds"]))


@pytest.fixture(scope="session")
def reference_settings():
    """The settings the reference fixtures were produced with."""
    import json

    return json.loads((EXPECTED / "settings.json").read_text())


@pytest.fixture(scope="session")
def published_dry_run():
    """`script/gpu-check --dry-run` in this process, every stage: what it prints (one string) and
    what it returns (the JSON of its --out). Its fake-tensor forwards at the published sizes take
    seconds, so the tests of the memory prediction, of the plans' weight transfers and of the
    attention calls read one run."""
    from bench.gpu_check import dry_run, parse_args

    lines = []
    result = dry_run(parse_args(["--dry-run"]), out=lines.append)
    return "\n".join(lines), result


@pytest.fixture(scope="session")
def cog_server(tiny_weights, tmp_path_factory):
    """Cog's HTTP server (script/serve) on the tiny weights, READY, shared by the tests that only
    need a working server (test_cog_server.py, test_script_predict.py)."""
    from serving import ServerUnderTest

    server = ServerUnderTest(tiny_weights, tmp_path_factory.mktemp("cog-server"))
    try:
        health = server.wait_for_setup()
        assert health["status"] == "READY", f"{health}\n{server.log_tail()}"
        yield server
    finally:
        server.stop()


@pytest.fixture
def small_keyframes(monkeypatch):
    """The keyframes stage, and so every later one, at SMALL_KEYFRAMES for one test."""
    from show1.stages import keyframes

    monkeypatch.setattr(keyframes, "HEIGHT", SMALL_KEYFRAMES[0])
    monkeypatch.setattr(keyframes, "WIDTH", SMALL_KEYFRAMES[1])
    return SMALL_KEYFRAMES


@pytest.fixture
def small_video(small_keyframes, monkeypatch):
    """A whole video at SMALL_KEYFRAMES, its final frames at SMALL_FINAL_FRAMES, for one test."""
    from show1.stages import sr2

    monkeypatch.setattr(sr2, "HEIGHT", SMALL_FINAL_FRAMES[0])
    monkeypatch.setattr(sr2, "WIDTH", SMALL_FINAL_FRAMES[1])
    return SMALL_FINAL_FRAMES
