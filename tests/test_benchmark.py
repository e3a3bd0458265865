"""script/benchmark and the execution plans it compares: the same networks, the same video, and
networks offloaded exactly around their own stage in the reference's plan (the low-memory plan's
uploads: tests/test_offload.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.benchmark import parse_args
from bench.cascade import stage_weight_bytes
from bench.random_weights import random_components
from show1 import Show1Pipeline
from show1.components import COMPONENTS, STAGES
from show1.plans import REFERENCE_PLAN, RESIDENT

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "script" / "benchmark"
# Up to the interpolated video and without the warm-up run, so both plans run in seconds on the CPU.
QUICK = ["--set", "keyframe_steps=2", "--set", "interpolation_steps=2", "--set", "output_stage=interpolated",
         "--no-warmup"]


def run_benchmark(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd="/", capture_output=True, text=True, timeout=600)


def plan_totals(output):
    """{plan: total seconds} from the report."""
    totals, plan = {}, None
    for line in output.splitlines():
        if line.startswith("plan "):
            plan = line.split()[1].rstrip(":")
        elif line.strip().startswith("total"):
            totals[plan] = float(line.split()[1])
    return totals


def test_benchmark_compares_both_plans_and_prints_the_ratio_last():
    result = run_benchmark("--device", "cpu", "--size", "tiny", "--plan", "reference", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    lines = result.stdout.strip().splitlines()

    totals = plan_totals(result.stdout)
    assert set(totals) == {"optimized", "reference"}
    for plan in totals:
        block = result.stdout.split(f"plan {plan}:")[1].split("plan ")[0]
        assert [line.split()[0] for line in block.strip().splitlines()[:3]] == ["text", "keyframes", "interpolation"]
        assert "peak process memory (RSS):" in block

    (agreement,) = [line for line in lines if line.startswith("plans agree")]
    assert float(re.search(r"difference\D+([\d.]+)", agreement).group(1)) < 1.0, agreement
    match = re.fullmatch(r"speedup_vs_reference=(\d+\.\d\d)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) == pytest.approx(totals["reference"] / totals["optimized"], abs=0.011)


@pytest.mark.parametrize("argv,named", [
    (["--set", "sr3_steps=4"], "sr3_steps"),
    (["--set", "sr1_steps=0"], "sr1_steps"),
    (["--set", "sr1_steps=many"], "sr1_steps must be int, got 'many'"),
])
def test_benchmark_refuses_unknown_settings(argv, named, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--device", "cpu", "--size", "tiny", *argv])
    assert refused.value.code == 2 and named in capsys.readouterr().err


def test_benchmark_refuses_a_missing_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        parse_args(["--device", "cuda"])
    assert refused.value.code == 2 and "--device cpu" in capsys.readouterr().err


def test_random_components_are_the_networks_the_pipeline_loads(tiny_pipeline):
    """The benchmark builds the tiny networks with exactly the tensors of those loaded from the tiny
    checkpoints, and every scheduler and tokenizer the pipeline uses."""
    built = random_components("tiny", "cpu", torch.float32)
    assert list(built.loaded) == list(COMPONENTS)
    for component in COMPONENTS:
        key = component.key
        loaded = tiny_pipeline.components[key]
        assert type(built[key]) is type(loaded), key
        if component.is_network:
            shapes = {name: tuple(t.shape) for name, t in built[key].state_dict().items()}
            assert shapes == {name: tuple(t.shape) for name, t in loaded.state_dict().items()}, key
        elif component.kind.name == "scheduler":
            assert dict(built[key].config) == dict(loaded.config), key
    per_stage = stage_weight_bytes(built)
    assert list(per_stage) == list(STAGES)
    assert per_stage["keyframes"] == sum(p.numel() * 4 for p in built.keyframes.unet.parameters())


def test_reference_plan_moves_each_stage_networks_to_the_device_only_for_that_stage(tiny_weights, small_video,
                                                                                  monkeypatch):
    # "cpu:0" stands for the GPU: the same memory, but the moves to it can be told from those back.
    loaded = Show1Pipeline.from_pretrained(tiny_weights, device="cpu", dtype=torch.float32)
    pipe = Show1Pipeline(loaded.components, "cpu:0", REFERENCE_PLAN)
    pipe.set_progress_bar_config(disable=True)
    events = []
    networks = {c.key: c for c in COMPONENTS if c.is_network}
    for key in networks:
        network = pipe.components[key]
        monkeypatch.setattr(network, "to", lambda device, key=key, move=network.to: (events.append((key, str(device))), move(device))[1])

    settings = dict(keyframe_steps=1, interpolation_steps=1, first_frame_steps=1, sr1_steps=1, sr2_steps=2, seed=5)
    result = pipe("a fox", on_stage_end=lambda stage, seconds: events.append(("end", stage)), **settings)

    expected_events = []
    for stage in STAGES:
        keys = [key for key, c in networks.items() if c.stage == stage]
        expected_events += [(key, "cpu:0") for key in keys] + [(key, "cpu") for key in keys] + [("end", stage)]
    assert events == expected_events
    assert result.frames.shape == (29, *small_video, 3)


def test_resident_plan_moves_nothing(tiny_weights, monkeypatch):
    pipe = Show1Pipeline.from_pretrained(tiny_weights, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.plan == RESIDENT
    for network in pipe.components.networks("keyframes") + pipe.components.networks("text"):
        monkeypatch.setattr(network, "to", lambda *args: pytest.fail("a network was moved"))
    pipe("a fox", keyframe_steps=1, output_stage="keyframes")
