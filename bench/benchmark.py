"""Seconds per stage, total and peak memory of the Show-1 cascade, on random weights.

usage: script/benchmark [--plan optimized|low-memory|reference] [--device cuda|cpu]
                        [--size published|tiny] [--dtype float16|float32] [--set NAME=VALUE ...]

Builds every network at its published size (or --size tiny) with random weights directly on the
device, nothing downloaded, and runs the whole cascade at the default settings (--set overrides
one, e.g. --set sr1_steps=50). --plan reference runs this project's plan and then the reference's
plan (every stage moved to the GPU before use and back to the CPU after it, the interpolation
segments one at a time) on the same networks, and prints `speedup_vs_reference=X.XX` last.
--plan low-memory measures the plan for 24 GB GPUs. `--device cpu --size tiny` runs anywhere.
"""

import argparse
import sys

import diffusers
import torch
import transformers

from bench.cascade import PLANS, benchmark, software_versions
from bench.random_weights import SIZES
from show1.settings import Show1Settings

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULTS = {name: value for name, value in vars(Show1Settings()).items() if name != "seed"}
STEP_SETTINGS = ("keyframe_steps", "interpolation_steps", "first_frame_steps", "sr1_steps", "sr2_steps")


def setting(text):
    """NAME=VALUE -> (name, value) with the type of the setting's default."""
    name, sep, value = text.partition("=")
    if not sep or name not in DEFAULTS:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(DEFAULTS)}; got {text!r}")
    kind = type(DEFAULTS[name])
    try:
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {kind.__name__}, got {value!r}") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="script/benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=PLANS, default="reference",
                        help="optimized: this project's plan; low-memory: stages offloaded between uses; "
                             "reference (default): optimized, then the reference's plan, and their ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=SIZES, default="published")
    parser.add_argument("--dtype", choices=DTYPES, help="default float16 on a GPU, float32 on the CPU")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="NAME=VALUE",
                        help="override a setting (show1.settings), e.g. sr1_steps=50 or output_stage=sr1; repeatable")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up run (one step per stage) before measuring")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the video")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu (with --size tiny)")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    try:
        args.settings = Show1Settings(seed=args.seed, **dict(args.set))
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return args


def main(argv):
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    settings = vars(args.settings)
    warmup = None if args.no_warmup else {**settings, **dict.fromkeys(STEP_SETTINGS, 1), "sr2_steps": 2}
    plans = ["optimized", "reference"] if args.plan == "reference" else [args.plan]
    print(software_versions(args.device))
    print("settings: " + ", ".join(f"{name}={value}" for name, value in settings.items()))
    benchmark(plans, args.size, args.device, args.dtype, settings, warmup, seed=args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
