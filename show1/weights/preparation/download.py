"""Fetching the Show-1 weights: only the files the cascade reads, from the Hugging Face Hub or from a
local copy of the five repos, stored as safetensors in the dtype each network runs in, with a manifest.

The steps, each safe to interrupt and re-run:
1. list each repo and choose its files with the loader's own rules (show1.weights.layout.component_files),
   and compute each checkpoint's size once converted (printed before anything large is fetched);
2. fetch the files that are not there yet (size checked, sha256 too where the Hub publishes it);
3. store each checkpoint as `.safetensors` in its network's serving dtype (show1.components,
   float32 modules of the class kept), check every tensor equals the published one cast to that
   dtype, delete a replaced `.bin`; with --keep-dtypes, only pickles are converted, bit-identically;
4. hash every file the cascade reads into DIR/manifest.json, with each checkpoint's dtypes.
A folder whose manifest still verifies, in the same precision, is left alone.
"""

import argparse
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from huggingface_hub import get_token
from tqdm import tqdm

from ...components import COMPONENTS, HUB_REPOS
from ..layout import WeightsError, component_files, is_checkpoint, is_pickle_index, required_files, safetensors_name
from ..manifest import (
    file_sha256,
    find_problems,
    manifest_path,
    manifest_precision,
    read_manifest,
    write_manifest,
)
from .conversion import (
    CONVERTED_FROM,
    CONVERTED_FROM_SIZE,
    PRECISION,
    PUBLISHED,
    SERVING,
    conversion_record,
    convert_networks,
    serving_sizes,
)
from .sources import DownloadError, HubSource, LocalSource, SourceFile, read_source_json

# Where script/download-weights and script/verify-weights look by default: weights/ of this project.
PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parents[3] / "weights"


def format_size(size) -> str:
    """Bytes in decimal units, as the Hub shows file sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000


# Which files


def select_repo_files(repo, listing, read_index) -> list:
    """The paths, relative to the repo, of the files the cascade reads from `repo`, chosen from
    `listing` (every path in the repo) with the rules the loader uses on disk: fp16 variants first,
    safetensors before pickles, an index with all its shards. `read_index(path)` returns the parsed
    JSON of a sharded checkpoint's index. Raises DownloadError naming what the listing lacks."""
    selected = ["model_index.json"]
    missing = [] if "model_index.json" in listing else ["model_index.json"]
    for component in [c for c in COMPONENTS if c.repo == repo]:
        prefix = component.folder + "/"
        names = {path[len(prefix):] for path in listing if path.startswith(prefix) and "/" not in path[len(prefix):]}
        found, absent = component_files(component, names, _reader_in_folder(read_index, prefix))
        selected += [prefix + name for name in found]
        missing += [prefix + name for name in absent]
    if missing:
        raise DownloadError(f"{repo} lacks files the cascade reads: {', '.join(missing)}")
    return selected


def _reader_in_folder(read_index, prefix):
    return lambda name: read_index(prefix + name)


# The whole job


@dataclass(frozen=True)
class PlannedFile:
    repo: str
    path: str  # inside the repo
    source: SourceFile
    size_on_disk: int  # once converted; estimated before fetching (see plan_files)

    def destination(self, weights_dir) -> Path:
        return Path(weights_dir) / self.repo / self.path

    def is_done(self, weights_dir, precision=SERVING) -> bool:
        """Already fetched with the listed size, or already converted from it to safetensors. A
        converted file is only written under its name once complete and checked. A file whose
        dtypes were changed cannot give the published ones back, so it only counts for SERVING."""
        dest = self.destination(weights_dir)
        if dest.is_file() and dest.stat().st_size == self.source.size:
            return True
        converted = dest.with_name(safetensors_name(dest.name))
        if is_pickle_index(dest.name):
            return converted.is_file()
        record = conversion_record(converted)
        return (
            record.get(CONVERTED_FROM) == dest.name
            and record.get(CONVERTED_FROM_SIZE) == str(self.source.size)
            and precision in (record.get(PRECISION), SERVING)
        )


def plan_files(source, precision=SERVING) -> list:
    """Lists and selects the files of every repo before anything large is fetched, so a refused
    or incomplete repo is reported at once. Each file comes with its size once converted."""
    plan = []
    for repo in HUB_REPOS:
        listing = source.list_files(repo)
        paths = select_repo_files(repo, listing, partial(read_source_json, source, repo))
        converted = serving_sizes(source, repo, paths) if precision == SERVING else {}
        plan += [PlannedFile(repo, path, listing[path], converted.get(path, listing[path].size)) for path in paths]
    return plan


def describe_plan(plan, pending, source, weights_dir) -> str:
    """The files per repo and overall: their size to fetch, on disk once converted, and what is
    left to fetch."""
    def summary(files):
        fetched, on_disk = sum(f.source.size for f in files), sum(f.size_on_disk for f in files)
        return f"{len(files):3d} files {format_size(fetched):>10} -> {format_size(on_disk):>10} on disk"

    def to_fetch(files):
        return f"{len(files):3d} files {format_size(sum(f.source.size for f in files)):>10}"

    def file_line(f):
        on_disk = format_size(f.size_on_disk)
        on_disk = f" -> {on_disk}" if on_disk != format_size(f.source.size) else ""
        return f"      {f.path} ({format_size(f.source.size)}{on_disk})"

    lines = [f"Show-1 weights from {source} into {weights_dir}:"]
    for repo in HUB_REPOS:
        in_repo = [f for f in plan if f.repo == repo]
        pending_in_repo = [f for f in pending if f.repo == repo]
        lines.append(f"  {repo:22s}{summary(in_repo)}   to fetch:{to_fetch(pending_in_repo)}")
        lines += [file_line(f) for f in pending_in_repo]
    lines.append(f"  {'total':22s}{summary(plan)}   to fetch:{to_fetch(pending)}")
    return "\n".join(lines)


def check_disk_space(weights_dir, plan, pending):
    """Fails before fetching when the disk cannot hold the files plus one conversion at a time
    (a checkpoint and its converted copy coexist until the copy is checked)."""
    largest_conversion = max((f.size_on_disk for f in plan if is_checkpoint(f.path)), default=0)
    needed = sum(f.source.size for f in pending) + largest_conversion
    free = shutil.disk_usage(weights_dir).free
    if free < needed:
        raise DownloadError(f"{weights_dir} has {format_size(free)} free; fetching and converting needs {format_size(needed)}")


def fetch_file(weights_dir, source, planned) -> Path:
    """Fetches one file and checks it against the source's listing; a bad copy is deleted."""
    dest = planned.destination(weights_dir)
    # A file of the wrong size is stale or cut short: remove it so that nothing trusts it.
    dest.unlink(missing_ok=True)
    source.fetch(planned.repo, planned.path, Path(weights_dir) / planned.repo)
    problem = _fetched_file_problem(dest, planned.source)
    if problem:
        dest.unlink(missing_ok=True)
        raise DownloadError(f"{planned.repo}/{planned.path} {problem}. Run the command again to fetch it again.")
    return dest


def _fetched_file_problem(dest, listed):
    if not dest.is_file():
        return "was not written"
    if dest.stat().st_size != listed.size:
        return f"has {dest.stat().st_size} bytes, the source lists {listed.size}"
    if listed.sha256 and file_sha256(dest) != listed.sha256:
        return "does not have the sha256 the Hub publishes"
    return None


def drop_broken_files(weights_dir, out=print, precision=SERVING) -> bool:
    """When DIR has a manifest: True if every file still matches it and it records `precision`
    (nothing to do); otherwise deletes the files that do not match, and the manifest, so that
    they are fetched (or converted) again."""
    if not manifest_path(weights_dir).is_file():
        return False
    try:
        entries = read_manifest(weights_dir)
    except WeightsError as error:
        out(f"{error}\nIgnoring it: every file is checked against the source instead.")
        manifest_path(weights_dir).unlink()
        return False
    with tqdm(total=sum(e.size for e in entries), unit="B", unit_scale=True, desc="verifying existing files") as bar:
        problems = find_problems(weights_dir, entries, bar.update)
    stored = manifest_precision(weights_dir)
    if not problems and stored == precision:
        out(f"All {len(entries)} files in {weights_dir} match {manifest_path(weights_dir).name}: nothing to do.")
        return True
    for entry, problem in problems:
        out(f"{problem}: fetching it again")
        (Path(weights_dir) / entry.path).unlink(missing_ok=True)
    if stored != precision:
        out(f"{weights_dir} holds the {stored} dtypes; storing the {precision} dtypes instead.")
    manifest_path(weights_dir).unlink()
    return False


def download_weights(weights_dir, source, out=print, precision=SERVING) -> Path:
    """Fills `weights_dir` with every file the cascade reads from `source`, stores every network
    as safetensors in the dtypes of `precision` (SERVING: the dtypes it runs in on a GPU;
    PUBLISHED: as published) and writes the manifest. Returns the manifest's path."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    if drop_broken_files(weights_dir, out, precision):
        return manifest_path(weights_dir)
    plan = plan_files(source, precision)
    pending = [f for f in plan if not f.is_done(weights_dir, precision)]
    out(describe_plan(plan, pending, source, weights_dir))
    check_disk_space(weights_dir, plan, pending)
    for number, planned in enumerate(pending, 1):
        out(f"[{number}/{len(pending)}] {planned.repo}/{planned.path} ({format_size(planned.source.size)})")
        fetch_file(weights_dir, source, planned)
    convert_networks(weights_dir, plan, precision, out)
    total = sum(path.stat().st_size for path in required_files(weights_dir))
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing for the manifest") as bar:
        manifest = write_manifest(weights_dir, bar.update, precision)
    out(f"Done: {weights_dir} holds every file the cascade reads ({format_size(total)}); {manifest} lists them.")
    return manifest


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="script/download-weights",
        description="Download the Show-1 weights (only the files the cascade reads), store every network "
        "as safetensors in the dtype it runs in on a GPU and write DIR/manifest.json. Safe to re-run: it resumes and skips "
        "what is already there. The DeepFloyd repo is gated: set HF_TOKEN (see docs/weights.md).",
    )
    parser.add_argument("weights_dir", nargs="?", type=Path, default=PROJECT_WEIGHTS_DIR,
                        help="where to put the weights (default: weights/ of this project)")
    parser.add_argument("--from", dest="local_dir", type=Path,
                        help="take the five repos from this folder (one sub-folder per repo) instead of the Hub")
    parser.add_argument("--keep-dtypes", action="store_true",
                        help="store every tensor in the dtype it is published in (T5 in float32: about 8 GB "
                        "more) instead of the dtype each network runs in on a GPU")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """script/download-weights: exit status 0 on success, 1 with a message saying what to do."""
    args = _parse_args(argv)
    # get_token(): HF_TOKEN, else the token saved by `hf auth login`.
    source = LocalSource(args.local_dir) if args.local_dir else HubSource(get_token())
    try:
        download_weights(args.weights_dir, source, precision=PUBLISHED if args.keep_dtypes else SERVING)
    except (DownloadError, WeightsError) as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted. Run the same command again to resume.", file=sys.stderr)
        return 130
    return 0
