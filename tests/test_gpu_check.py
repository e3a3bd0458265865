"""script/gpu-check: the one command that measures every speed and memory goal on a GPU, run here
end to end on the CPU with tiny networks, and its dry run, which predicts GPU memory at the
published sizes on fake tensors."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bench.fake_memory import FlashAttentionStandIn, LiveStorageBytes
from bench.gpu_check import parse_args
from bench.step_clock import StageSteps, default_steps_per_loop, estimate_video, short_run_settings
from bench.switches import FirstCall, measure_switch
from show1.settings import Show1Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "script" / "gpu-check"
NUMBER = r"(\d+\.\d\d|n/a)"
LAST_LINE = re.compile(
    rf"gpu-check: total_default_s={NUMBER} speedup_vs_reference={NUMBER} peak_resident_gib={NUMBER} "
    rf"peak_low_memory_gib={NUMBER} setup_s={NUMBER}"
)
GIB = 2**30


def run_gpu_check(*args, cwd):
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


# The step clock's arithmetic


def test_a_stage_costs_its_steady_steps_plus_what_it_does_once():
    # Two loops (as two interpolation batches): the first step of each pays first-use costs.
    run = StageSteps(seconds=20.0, loops=[[3.0, 1.0, 1.2], [2.5, 0.8, 1.0]])
    assert run.steps == 6
    assert run.step_seconds == pytest.approx(1.0)  # median of 1.0, 1.2, 0.8, 1.0
    assert run.one_off_seconds == pytest.approx(14.0)
    # A single step per loop is all there is to time.
    assert StageSteps(seconds=5.0, loops=[[2.0], [4.0]]).step_seconds == pytest.approx(3.0)
    assert StageSteps(seconds=1.5, loops=[]).one_off_seconds == pytest.approx(1.5)


def test_the_video_estimate_uses_the_default_steps_and_the_loops_of_the_run():
    defaults = Show1Settings()
    steps = default_steps_per_loop()
    assert steps == {"keyframes": 75, "interpolation": 75, "first_frame": 70, "sr1": 125, "sr2": 40}
    assert steps["sr2"] == int(defaults.sr2_steps * defaults.sr2_strength)
    loop = [[0.5, 0.1]]
    stages = {
        "text": StageSteps(2.0),
        "keyframes": StageSteps(1.0, loop),
        "interpolation": StageSteps(7.0, loop * 7),  # the reference plan: one loop per segment
        "sr1": StageSteps(4.0, loop * 4),  # four windows
    }
    estimate = estimate_video(stages)
    assert {s: e.steps_per_video for s, e in estimate.items()} == {"text": 0, "keyframes": 75, "interpolation": 525, "sr1": 500}
    assert estimate["text"].seconds == pytest.approx(2.0)
    assert estimate["sr1"].seconds == pytest.approx(500 * 0.1 + (4.0 - 8 * 0.1))


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
def test_short_runs_take_the_same_number_of_steps_in_every_stage(steps):
    settings = Show1Settings(**short_run_settings(steps))
    assert set(default_steps_per_loop(settings).values()) == {steps}


# The checks


def test_the_live_byte_count_follows_allocations_and_frees():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1024, 1024)  # 4 MiB, made before counting: not counted
        counter = LiveStorageBytes()
        with counter:
            y = x * 2  # +4 MiB
            y = y.view(-1)  # a view: nothing new
            z = y + 1  # +4 MiB, peak 8 MiB
            del y  # -4 MiB
            w = z.half()  # +2 MiB: 6 MiB live
        assert counter.peak == 8 * 2**20
        assert counter.live == 6 * 2**20
        del z, w
        assert counter.live == 0


def test_the_flash_stand_in_allocates_no_attention_matrix():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # One sr2 spatial attention: 58 frames x 2,880 positions, heads of 5 channels (padded to 8).
    with FakeTensorMode():
        q = torch.empty(58, 64, 2880, 5, dtype=torch.float16)
        counter = LiveStorageBytes()
        with counter, FlashAttentionStandIn():
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    positions = 58 * 64 * 2880
    padded_copies, log_sum_exp, output = 3 * positions * 8 * 2, positions * 4, positions * 5 * 2
    assert counter.peak == padded_copies + log_sum_exp + output  # the math kernel would need 58*64*2880**2*2 bytes


def test_the_command_refuses_a_missing_gpu_and_unknown_switches(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--switches", "compile,turbo"])
    assert "turbo" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])
        assert "--dry-run" in capsys.readouterr().err
    assert parse_args(["--switches", "none", "--device", "cpu"]).switches == []
    assert parse_args(["--dry-run", "--stages", "first_frame,sr2"]).stages == ["first_frame", "sr2"]
    with pytest.raises(SystemExit):
        parse_args(["--dry-run", "--stages", "sr3"])
    assert "sr3" in capsys.readouterr().err


def test_switches_apply_to_a_network_and_restore_it():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).eval()
    x = torch.randn(2, 3, 8, 8)
    eager = network(x)
    first_call = FirstCall(network)
    network(x)
    assert first_call.args[0] is x
    for name in ("channels_last", "compile"):
        result = measure_switch(name, "keyframes", network, first_call, "cpu", repeats=1)
        assert result.status == "measured", result.status
        assert result.seconds_per_forward > 0 and result.warmup_seconds > 0
    assert "forward" not in vars(network)  # the compiled forward is gone
    assert network[0].weight.is_contiguous()
    torch.testing.assert_close(network(x), eager)


# The command, end to end


def test_tiny_cpu_run_answers_every_question_and_ends_with_the_summary(tmp_path):
    # Up to the interpolated video (both plans batch it differently), so the four runs of the
    # cascade take seconds on the CPU; the full cascade runs the same code with two more UNets.
    result = run_gpu_check(
        "--device", "cpu", "--size", "tiny", "--steps", "1", "--no-warmup", "--repeats", "1", "--output-stage", "interpolated",
        "--switches", "channels_last,cudagraphs", "--out", "report.json", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    last = result.stdout.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    total, speedup, peak_resident, peak_low_memory, setup = match.groups()
    assert (peak_resident, peak_low_memory) == ("n/a", "n/a")  # no GPU memory on the CPU
    assert "n/a" not in (total, speedup, setup)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["errors"] == {}
    assert report["total_default_s"] == pytest.approx(float(total), abs=0.006)
    ran = ["text", "keyframes", "interpolation"]
    ours, ref = (report["plans"][plan]["stages"] for plan in ("optimized", "reference"))
    assert list(ours) == list(ref) == ran
    assert {stage: ours[stage]["steps_per_video"] for stage in ran} == {"text": 0, "keyframes": 75, "interpolation": 75}
    assert ref["interpolation"]["steps_per_video"] == 7 * 75  # one segment at a time
    for stage in ran[1:]:
        assert ours[stage]["step_seconds"] > 0 and ref[stage]["step_seconds"] > 0
    assert report["plans"]["optimized"]["total_default_s"] == pytest.approx(sum(s["seconds_per_video"] for s in ours.values()))
    assert float(speedup) == pytest.approx(report["plans"]["reference"]["total_default_s"] / float(total), abs=0.006)

    assert report["finite"] == dict.fromkeys(ran, True)
    for stage in ran[1:]:
        assert sum(report["attention"][stage].values()) > 0, stage
    assert report["fused_attention_only"] is None  # judged on a GPU only
    assert report["setup"]["setup_s"] > 0 and report["setup"]["write_s"] > 0

    status = {(r["switch"], r["stage"]): r["status"] for r in report["switches"]}
    for name in ("eager", "channels_last"):
        assert [status[name, stage] for stage in ran[1:]] == ["measured", "measured"]
        assert [status[name, stage] for stage in ("first_frame", "sr1", "sr2")] == ["skipped: stage not run"] * 3
    assert {stage: s for (name, stage), s in status.items() if name == "cudagraphs"} == dict.fromkeys(
        ["keyframes", "interpolation", "first_frame"], "skipped-on-cpu")
    measured = [r for r in report["switches"] if r["status"] == "measured"]
    assert all(r["seconds_per_forward"] > 0 and r["warmup_seconds"] > 0 for r in measured)


def test_dry_run_predicts_every_stage_at_its_published_size(published_dry_run):
    # In this process, shared with test_offload and test_attention (the command's own run, with
    # --out, is the tiny run's test above).
    stdout, prediction = published_dry_run
    print(stdout)
    match = re.search(r"^predicted_peak_gib resident=(\d+\.\d\d) low_memory=(\d+\.\d\d)$", stdout, re.MULTILINE)
    assert match, stdout
    stages = prediction["stages"]
    assert list(stages) == ["text", "keyframes", "interpolation", "first_frame", "sr1", "sr2"]
    stage = stages["first_frame"]
    # IF-II-L's 1,243,277,190 parameters in float16.
    assert stage["weights_gib"] == pytest.approx(1_243_277_190 * 2 / GIB)
    # Batch 2 at 256x160 with fused attention: hundreds of MiB, never the GiBs of the math kernel.
    assert 0.1 < stage["activations_gib"] < 1.0
    # Low-memory: the stage alone, and sr1's networks (1.48 GiB), uploaded while it computes.
    assert stage["prefetches"] == "sr1"
    assert stage["low_memory_gib"] == pytest.approx(stage["weights_gib"] + stage["activations_gib"] + 1.48, abs=0.011)
    # The low-memory plan's peak is its largest stage's.
    assert float(match.group(2)) == pytest.approx(max(s["low_memory_gib"] for s in stages.values()), abs=0.006)
    # Resident: every network of the cascade (12.1 B parameters, T5's wo in float32) plus the
    # largest activations of any stage.
    assert 24 < float(match.group(1)) - max(s["activations_gib"] for s in stages.values()) < 25
    # The plan that predict.py picks on each of Replicate's GPUs, from its total memory.
    assert "plan_for_total_gib 14.7=low_memory 22.0=low_memory 39.6=resident 44.4=resident 79.2=resident" in stdout
    # A default video's weight moves: the low-memory plan uploads each weight once, nothing comes back.
    assert "low_memory_transfer_gib h2d=24.40 d2h=0.00 weights=24.40" in stdout
