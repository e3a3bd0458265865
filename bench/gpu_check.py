"""script/gpu-check: every open speed and memory question of the cascade, in one short run.

On a GPU, with random weights at the published sizes (nothing downloaded), in the serving dtypes:

1. seconds per denoising step and one-off seconds of each stage, under this project's plan and
   under the reference's plan, from short runs of the whole cascade (a few steps per stage), and
   the seconds per video they add up to at the default settings; their ratio;
2. peak GPU memory of a short cascade with every stage resident, and with the low-memory plan;
   during the low-memory run, that every stage's outputs are finite and which attention kernel
   each attention call used;
3. setup: the random networks written as a weights folder and loaded by from_pretrained;
4. speed switches (channels_last, torch.compile, CUDA graphs) on each UNet forward, with the
   compile or capture time a cold boot would pay, until the time budget is spent.

`--device cpu --size tiny` runs the same code anywhere. `--dry-run` predicts peak GPU memory at
the published sizes on fake tensors (bench.fake_memory), on any machine.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import diffusers
import torch
import transformers

from show1 import Show1Pipeline
from show1.components import STAGES
from show1.failures import NonFiniteOutputError, failed_stage
from show1.plans import LOW_MEMORY, REFERENCE_PLAN, REPLICATE_GPU_TOTAL_GIB, plan_for_device_memory
from show1.settings import OUTPUT_STAGES

from . import fake_memory
from .attention_census import AttentionCensus
from .cascade import PLANS, PROMPT, place_networks, software_versions, stage_weight_bytes
from .random_weights import SIZES, random_components
from .step_clock import StepClock, estimate_video, short_run_settings, synchronize
from .switches import SWITCHES, UNET_STAGES, WARMUP_CALLS, FirstCall, measure_switches
from .transfers import count_transfers
from .weights_folder import write_weights_folder

GIB = 2**30
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OPTIONAL_SWITCHES = [name for name in SWITCHES if name != "eager"]
# Seconds the whole check may take before the switches still to measure are skipped: 8 minutes of
# wall time on an H100/H200-class GPU, less two for the compile that may be running at that moment.
DEFAULT_BUDGET_S = 360


# One run of the cascade


@dataclass
class CascadeRun:
    plan: str
    stages: dict  # {stage: StageSteps}
    seconds: float
    peak_bytes: Optional[int]  # device memory; None on the CPU
    finite: dict = field(default_factory=dict)  # {stage: bool} of the stages that ran, when checked
    attention: dict = field(default_factory=dict)  # {stage: {kernel: calls}}, when counted
    error: Optional[str] = None


def run_cascade(plan, components, device, settings, checks=False) -> CascadeRun:
    """The whole cascade once under `plan`, with its steps timed; with `checks`, also reports which
    stages' outputs were finite (the pipeline stops at the first that is not, naming it) and counts
    attention kernels (Python hooks: not for timing)."""
    place_networks(components, plan, device)
    pipe = Show1Pipeline(components, device, PLANS[plan])
    clock = StepClock(device)
    pipe.set_progress_bar_config(disable=True)  # the clock's timings are the report; a bar would break it up
    census = AttentionCensus() if checks else None

    def on_stage_end(stage, seconds):
        clock.end_stage(stage, seconds)
        if census:
            census.end_stage(stage)

    cuda = torch.device(device).type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    error, non_finite_stage = None, None
    start = time.perf_counter()
    with census or nullcontext():
        try:
            pipe(PROMPT, on_stage_end=on_stage_end, callback_on_step_begin=clock.step_begins,
                 callback_on_step_end=clock.step_ends, **settings)
        except Exception as failure:  # a stage that fails is the finding this run reports
            error = f"{type(failure).__name__}: {str(failure)[:300]}"
            if isinstance(failure, NonFiniteOutputError):
                non_finite_stage = failed_stage(failure)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    run = CascadeRun(plan, clock.stages, seconds, peak, error=error)
    if checks:
        run.finite = {stage: True for stage in clock.stages}
        if non_finite_stage:
            run.finite[non_finite_stage] = False
        run.attention = {stage: dict(counts) for stage, counts in census.by_stage.items()}
    return run


# The check


@dataclass
class Report:
    device: str
    size: str
    dtype: str
    steps_per_stage: int
    plans: dict = field(default_factory=dict)  # {plan: {"stages": {...}, "total_default_s": x}}
    speedup_vs_reference: Optional[float] = None
    peak_resident_gib: Optional[float] = None
    peak_low_memory_gib: Optional[float] = None
    weights_gib: dict = field(default_factory=dict)
    finite: dict = field(default_factory=dict)
    attention: dict = field(default_factory=dict)
    fused_attention_only: Optional[bool] = None
    setup: dict = field(default_factory=dict)
    switches: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    wall_s: Optional[float] = None

    @property
    def total_default_s(self):
        return self.plans.get("optimized", {}).get("total_default_s")


def plan_summary(run: CascadeRun) -> dict:
    """The run's per-stage step costs and the seconds per video they predict at the defaults."""
    estimates = estimate_video(run.stages)
    return {
        "stages": {stage: {**asdict(e), "seconds_per_video": e.seconds, "short_run_seconds": run.stages[stage].seconds}
                   for stage, e in estimates.items()},
        "total_default_s": sum(e.seconds for e in estimates.values()),
        "short_run_s": run.seconds,
    }


def gib(nbytes):
    return None if nbytes is None else nbytes / GIB


def measure_plans(report, components, device, steps, warmup, output_stage, out=print):
    """Timing runs of both plans, then the low-memory run with the checks; each stops after
    `output_stage` (show1.settings.OUTPUT_STAGES)."""
    settings = {**short_run_settings(steps), "output_stage": output_stage}
    first_calls = {stage: FirstCall(getattr(components, stage).unet) for stage in UNET_STAGES}
    runs = {}
    for name, plan, run_settings, checks in (
        ("warm-up", "optimized", {**short_run_settings(1), "output_stage": output_stage}, False),
        ("optimized", "optimized", settings, False),
        ("reference", "reference", settings, False),
        ("low-memory", "low-memory", settings, True),
    ):
        if name == "warm-up" and not warmup:
            continue
        runs[name] = run_cascade(plan, components, device, run_settings, checks)
        out(f"ran the cascade ({name} run, plan {plan}) in {runs[name].seconds:.1f} s")
    for plan, run in runs.items():
        if run.error:
            report.errors[plan] = run.error
    for plan in ("optimized", "reference"):
        report.plans[plan] = plan_summary(runs[plan])
    if not report.errors:
        report.speedup_vs_reference = report.plans["reference"]["total_default_s"] / report.total_default_s
    report.peak_resident_gib = gib(runs["optimized"].peak_bytes)
    report.peak_low_memory_gib = gib(runs["low-memory"].peak_bytes)
    report.finite = runs["low-memory"].finite
    report.attention = runs["low-memory"].attention
    image_stages = [stage for stage in STAGES if stage != "text"]  # the stages held to fused kernels
    report.fused_attention_only = all(
        set(report.attention.get(stage, {})) <= {"flash_attention", "efficient_attention", "cudnn_attention"}
        for stage in image_stages
    ) if torch.device(device).type == "cuda" else None
    return first_calls


def measure_setup(report, components, size, device, dtype, setup_dir):
    """Writes the networks as a weights folder and times from_pretrained; returns the loaded
    pipeline's components (resident on the device), which replace `components`: those are freed
    first, since two copies of the weights (about 49 GiB) fit no 40 or 48 GB card."""
    with tempfile.TemporaryDirectory(dir=setup_dir, prefix="show1-gpu-check-") as folder:
        start = time.perf_counter()
        write_weights_folder(components, size, folder)
        written = time.perf_counter()
        free_networks(components, device)
        pipe = Show1Pipeline.from_pretrained(folder, device=device, dtype=dtype)
        synchronize(device)
        loaded = time.perf_counter()
    report.setup = {"write_s": written - start, "setup_s": loaded - written}
    return pipe.components


def free_networks(components, device):
    """Drops the networks' weights (they become meta tensors) and hands the device memory back."""
    for network in components.networks():
        network.to("meta")
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()


def gpu_check(args, out=print) -> Report:
    started = time.perf_counter()
    deadline = started + args.budget_s
    report = Report(args.device, args.size, str(args.dtype).replace("torch.", ""), args.steps)
    components = random_components(args.size, args.device, args.dtype, args.seed)
    out(f"built {args.size} networks with random weights on {args.device} in {time.perf_counter() - started:.1f} s")
    report.weights_gib = {stage: gib(b) for stage, b in stage_weight_bytes(components).items()}
    first_calls = measure_plans(report, components, args.device, args.steps, args.warmup,
                               args.output_stage, out)
    if not args.skip_setup:
        components = measure_setup(report, components, args.size, args.device, args.dtype, args.setup_dir)
    place_networks(components, "optimized", args.device)
    report.switches = [asdict(r) for r in measure_switches(
        args.switches, components, first_calls, args.device, args.repeats, deadline,
        WARMUP_CALLS if args.warmup else 1)]
    report.wall_s = time.perf_counter() - started
    return report


# The report


def number(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def stage_table(report) -> list:
    ours, ref = report.plans["optimized"]["stages"], report.plans["reference"]["stages"]
    header = (f"{'stage':<14}{'steps':>7}{'s/step':>9}{'one-off':>9}{'video s':>9} |{'steps':>7}{'s/step':>9}"
              f"{'one-off':>9}{'video s':>9} | finite | attention kernels (calls)")
    lines = [f"{'':<14}{'this project (resident)':^34} |{'reference plan':^34} |", header]
    for stage in ours:
        cells = ""
        for plan in (ours, ref):
            e = plan.get(stage)
            cells += (f"{e['steps_per_video']:>7}{e['step_seconds']:>9.4f}{e['one_off_seconds']:>9.2f}"
                      f"{e['seconds_per_video']:>9.2f} |") if e else f"{'n/a':>34} |"
        finite = {True: "yes", False: "NO"}.get(report.finite.get(stage), "n/a")
        kernels = ", ".join(f"{k} {n}" for k, n in sorted(report.attention.get(stage, {}).items())) or "-"
        lines.append(f"{stage:<14}{cells} {finite:>6} | {kernels}")
    lines.append(f"{'total':<14}{'':>25}{report.plans['optimized']['total_default_s']:>9.2f} |"
                 f"{'':>25}{report.plans['reference']['total_default_s']:>9.2f} |")
    return lines


def switch_table(report) -> list:
    eager = {r["stage"]: r["seconds_per_forward"] for r in report.switches if r["switch"] == "eager"}
    steps = {stage: e["steps_per_video"] for stage, e in report.plans["optimized"]["stages"].items()}
    lines = [f"{'switch':<14}{'stage':<14}{'s/forward':>10}{'x eager':>9}{'warm-up s':>11}{'saves s/video':>15}  status"]
    for r in report.switches:
        base, mine = eager.get(r["stage"]), r["seconds_per_forward"]
        ratio = base / mine if base and mine else None
        saved = (base - mine) * steps.get(r["stage"], 0) if base is not None and mine is not None else None
        lines.append(f"{r['switch']:<14}{r['stage']:<14}{number(mine, 4):>10}{number(ratio):>9}"
                     f"{number(r['warmup_seconds']):>11}{number(saved):>15}  {r['status']}")
    return lines


def last_line(report) -> str:
    return (f"gpu-check: total_default_s={number(report.total_default_s)} "
            f"speedup_vs_reference={number(report.speedup_vs_reference)} "
            f"peak_resident_gib={number(report.peak_resident_gib)} peak_low_memory_gib={number(report.peak_low_memory_gib)} "
            f"setup_s={number(report.setup.get('setup_s'))}")


def print_report(report, out=print):
    out(f"seconds per video at the default settings, from {report.steps_per_stage} step(s) per stage "
        f"({report.device}, {report.size}, {report.dtype}):")
    for line in stage_table(report):
        out(line)
    memory = "peak GPU memory" if report.device.startswith("cuda") else "peak GPU memory (n/a on the CPU)"
    out(f"{memory}: resident {number(report.peak_resident_gib)} GiB, low-memory {number(report.peak_low_memory_gib)} GiB; "
        f"weights {number(sum(report.weights_gib.values()))} GiB")
    fused = {True: "yes", False: "NO", None: "n/a on the CPU"}[report.fused_attention_only]
    out(f"every image-stage attention call on a fused kernel: {fused}")
    if report.setup:
        out(f"setup: weights written in {report.setup['write_s']:.1f} s, loaded by from_pretrained in {report.setup['setup_s']:.1f} s")
    for line in switch_table(report):
        out(line)
    for plan, error in report.errors.items():
        out(f"FAILED in the {plan} run: {error}")
    out(f"gpu-check took {report.wall_s:.0f} s")
    out(last_line(report))


def dry_run(args, out=print) -> dict:
    out("predicted peak GPU memory at the published sizes (fake tensors, flash attention, serving dtypes):")
    prediction = fake_memory.predict(args.stages, out=out)
    for line in fake_memory.format_prediction(prediction):
        out(line)
    out("plan_for_total_gib " + " ".join(f"{total}={plan_for_device_memory(total * GIB).name}"
                                         for total in REPLICATE_GPU_TOTAL_GIB.values()))
    # Calls that a T4's kernels would refuse (heads not a multiple of 8): 0 while the UNets pad.
    out(f"attention_calls_needing_flash={prediction.attention_calls_needing_flash}")
    # What crosses the bus in a default video, counted on the plans' own moves (bench.transfers): the
    # low-memory plan uploads each weight once; the reference's model offload moves it there and back.
    transfers = {plan.name: count_transfers(plan) for plan in (LOW_MEMORY, REFERENCE_PLAN)}
    for name, t in transfers.items():
        out(f"{name}_transfer_gib h2d={t.h2d_bytes / GIB:.2f} d2h={t.d2h_bytes / GIB:.2f} weights={t.weight_bytes / GIB:.2f}")
    out(f"low_memory_pinned_host_gib={transfers[LOW_MEMORY.name].pinned_host_bytes / GIB:.2f}")
    return {
        "stages": {s: {"weights_gib": gib(p.weight_bytes), "activations_gib": gib(p.activation_peak_bytes),
                       "alone_gib": gib(p.peak_bytes), "low_memory_gib": gib(prediction.low_memory_stage_bytes(s)),
                       "prefetches": prediction.prefetched(s)} for s, p in prediction.stages.items()},
        "predicted_peak_gib": {"resident": gib(prediction.resident_bytes), "low_memory": gib(prediction.low_memory_bytes)},
        "attention_calls_needing_flash": prediction.attention_calls_needing_flash,
        "transfers_gib": {name: {"h2d": gib(t.h2d_bytes), "d2h": gib(t.d2h_bytes), "weights": gib(t.weight_bytes)}
                          for name, t in transfers.items()},
        "low_memory_pinned_host_gib": gib(transfers[LOW_MEMORY.name].pinned_host_bytes),
    }


# Command line


def name_list(choices):
    def parse(text):
        names = [] if text == "none" else [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose among {', '.join(choices)} or none")
        return names

    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="script/gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="published")
    parser.add_argument("--dtype", choices=DTYPES, help="default float16 on a GPU, float32 on the CPU")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per stage in each short run (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per switch and stage (default 5)")
    parser.add_argument("--switches", type=name_list(OPTIONAL_SWITCHES), default=OPTIONAL_SWITCHES,
                        help=f"comma-separated, or none (default {','.join(OPTIONAL_SWITCHES)})")
    parser.add_argument("--skip-setup", action="store_true", help="do not write and reload the weights (needs "
                        "disk space for all of them: about 26 GB at the published size)")
    parser.add_argument("--setup-dir", help="where the weights are written for the setup time (default: the temp folder)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up run of the cascade (one step per stage), and warm each switch "
                             f"up with one forward instead of {WARMUP_CALLS} (too few for compile and cudagraphs)")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds after which switches not yet measured are skipped (default {DEFAULT_BUDGET_S} "
                             "on a GPU, none on the CPU)")
    parser.add_argument("--output-stage", choices=OUTPUT_STAGES, default="full",
                        help="stop each run after this stage (default full: the whole cascade)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    parser.add_argument("--dry-run", action="store_true",
                        help="predict peak GPU memory at the published sizes on fake tensors (no GPU needed)")
    parser.add_argument("--stages", type=name_list(list(fake_memory.STAGE_CALLS)), default=list(fake_memory.STAGE_CALLS),
                        help="with --dry-run: comma-separated stages to run (default all)")
    args = parser.parse_args(argv)
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --size tiny, or --dry-run")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.dry_run and not args.stages:
        parser.error("--stages needs at least one stage")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S if args.device.startswith("cuda") else math.inf
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show while the check runs
    # Old published configs carry keys today's classes ignore; the warnings about them are noise here.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the setup's loading bars would break up the report
    if args.dry_run:
        results = dry_run(args)
    else:
        print(software_versions(args.device))
        report = gpu_check(args)
        print_report(report)
        results = {**asdict(report), "total_default_s": report.total_default_s}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
