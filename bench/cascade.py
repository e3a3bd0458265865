"""Speed and memory of the cascade, on random weights: nothing is downloaded.

Every network is built from the configs in bench/configs (`published`: the sizes on the Hub;
`tiny`: the test weights' sizes) directly on the device (bench/random_weights.py). The schedulers are the published ones;
the tokenizers are small stand-ins (they only turn the prompt into token ids). The same networks
then run under one or more execution plans (show1.plans.ExecutionPlan), so the speed-up over
the reference's plan is a ratio measured in one process, on one device.
"""

import resource
import time
from dataclasses import dataclass, field

import diffusers
import torch
import transformers

from show1.components import STAGES
from show1.pipeline import Show1Pipeline
from show1.plans import LOW_MEMORY, REFERENCE_PLAN, RESIDENT

from .random_weights import random_components

PLANS = {"optimized": RESIDENT, "low-memory": LOW_MEMORY, "reference": REFERENCE_PLAN}
PROMPT = "A panda taking a selfie, 4k, high resolution"
GIB = 2**30


def weight_bytes(network) -> int:
    return sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])


def stage_weight_bytes(components) -> dict:
    """Bytes of weights each stage needs on the device."""
    return {stage: sum(weight_bytes(network) for network in components.networks(stage)) for stage in STAGES}


@dataclass
class PlanResult:
    plan: str
    stage_seconds: dict
    total_seconds: float
    peak_memory_bytes: int  # device memory on a GPU, the process's resident set on the CPU
    frames: object = field(repr=False, default=None)


def software_versions(device) -> str:
    """The report's first line: the package versions, and the GPU's name on one."""
    line = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    return line + (f", {torch.cuda.get_device_name(device)}" if str(device).startswith("cuda") else "")


def peak_host_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def place_networks(components, plan, device):
    """Networks where plan `plan` (a PLANS name) keeps them between stages."""
    for network in components.networks():
        network.to(PLANS[plan].idle_device(device))


def run_plan(name, components, device, settings) -> PlanResult:
    """The cascade once under plan `name`. The networks start where the plan keeps them."""
    place_networks(components, name, device)
    pipe = Show1Pipeline(components, device, PLANS[name])
    pipe.set_progress_bar_config(disable=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = pipe(PROMPT, **settings)
    total = time.perf_counter() - start
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_host_memory_bytes()
    return PlanResult(name, dict(result.timings), total, peak, result.frames)


def format_plan(result: PlanResult, device) -> str:
    memory = "peak GPU memory" if torch.device(device).type == "cuda" else "peak process memory (RSS)"
    lines = [f"plan {result.plan}:"]
    lines += [f"  {stage:<14}{seconds:9.2f} s" for stage, seconds in result.stage_seconds.items()]
    lines += [f"  {'total':<14}{result.total_seconds:9.2f} s", f"  {memory}: {result.peak_memory_bytes / GIB:.2f} GiB"]
    return "\n".join(lines)


def format_weights(components) -> str:
    per_stage = stage_weight_bytes(components)
    resident = sum(per_stage.values())  # every network belongs to exactly one stage
    largest = max(per_stage, key=per_stage.get)
    return (f"weights: {resident / GIB:.2f} GiB with every stage resident; largest stage {largest} "
            f"{per_stage[largest] / GIB:.2f} GiB (the floor of the low-memory plan)")


def benchmark(plans, size, device, dtype, settings, warmup_settings=None, seed=0, out=print) -> dict:
    """Runs each plan once (after one warm-up run of the first plan with `warmup_settings`, when
    given) and prints the report; returns {plan: PlanResult}. With both "optimized" and
    "reference", the last line printed is `speedup_vs_reference=X.XX`."""
    started = time.perf_counter()
    components = random_components(size, device, dtype, seed)
    out(f"built {size} networks with random weights on {device} ({dtype}) in {time.perf_counter() - started:.1f} s")
    out(format_weights(components))
    if warmup_settings is not None:
        run_plan(plans[0], components, device, warmup_settings)
    results = {}
    for name in plans:
        results[name] = run_plan(name, components, device, settings)
        out(format_plan(results[name], device))
    if "optimized" in results and "reference" in results:
        frames = [results[name].frames.astype(float) for name in ("optimized", "reference")]
        out(f"plans agree: mean |difference| of the final frames {abs(frames[0] - frames[1]).mean():.3f} (0-255)")
        speedup = results["reference"].total_seconds / results["optimized"].total_seconds
        out(f"speedup_vs_reference={speedup:.2f}")
    return results
