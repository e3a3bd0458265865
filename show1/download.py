"""Fetching the Show-1 weights: only the files the cascade reads, from the Hugging Face Hub or from a
local copy of the five repos, with every PyTorch pickle converted to safetensors and a manifest.

The steps, each safe to interrupt and re-run:
1. list each repo and choose its files with the loader's own rules (show1.weights.component_files);
2. fetch the files that are not there yet (size checked, sha256 too where the Hub publishes it);
3. convert each `.bin` to `.safetensors`, check the tensors are bit-identical, delete the `.bin`;
4. hash every file the cascade reads into DIR/manifest.json.
A folder whose manifest still verifies is left alone.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .manifest import (
    PROJECT_WEIGHTS_DIR,
    file_sha256,
    find_problems,
    format_size,
    manifest_path,
    read_manifest,
    write_manifest,
    written_atomically,
)
from .weights import COMPONENTS, HUB_REPOS, WeightsError, component_files, required_files

HUB_URL = "https://huggingface.co"
COPY_CHUNK = 8 << 20


class DownloadError(RuntimeError):
    """The weights could not be fetched or converted; the message says why and what to do."""


class ConversionError(DownloadError):
    """A pickle could not be converted to safetensors exactly."""


@dataclass(frozen=True)
class SourceFile:
    """A file as a source lists it."""

    size: int
    sha256: Optional[str] = None  # published by the Hub for large (LFS) files


# ---------------------------------------------------------------------------------------------
# Which files


def select_repo_files(repo, listing, read_index) -> list:
    """The paths, relative to the repo, of the files the cascade reads from `repo`, chosen from
    `listing` (every path in the repo) with the rules the loader uses on disk: fp16 variants first,
    safetensors before pickles, an index with all its shards. `read_index(path)` returns the parsed
    JSON of a sharded checkpoint's index. Raises DownloadError naming what the listing lacks."""
    selected = ["model_index.json"]
    missing = [] if "model_index.json" in listing else ["model_index.json"]
    for key, component in COMPONENTS.items():
        if component.repo != repo:
            continue
        prefix = component.folder + "/"
        names = {path[len(prefix):] for path in listing if path.startswith(prefix) and "/" not in path[len(prefix):]}
        found, absent = component_files(key, names, _reader_in_folder(read_index, prefix))
        selected += [prefix + name for name in found]
        missing += [prefix + name for name in absent]
    if missing:
        raise DownloadError(f"{repo} lacks files the cascade reads: {', '.join(missing)}")
    return selected


def _reader_in_folder(read_index, prefix):
    return lambda name: read_index(prefix + name)


# ---------------------------------------------------------------------------------------------
# Where from: a local copy of the repos, or the Hub


class LocalSource:
    """The five repos as sub-folders of a local folder (a mirror, a pre-downloaded snapshot)."""

    def __init__(self, root):
        self.root = Path(root)

    def __str__(self):
        return str(self.root)

    def list_files(self, repo) -> dict:
        folder = self.root / repo
        if not folder.is_dir():
            raise DownloadError(
                f"{folder} does not exist: --from expects one sub-folder per repo ({', '.join(HUB_REPOS)})"
            )
        # is_file() and stat() follow links, so Hub cache snapshots (links to blobs) work too.
        return {p.relative_to(folder).as_posix(): SourceFile(p.stat().st_size) for p in folder.rglob("*") if p.is_file()}

    def fetch(self, repo, path, repo_dir) -> Path:
        source, target = self.root / repo / path, Path(repo_dir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(target) as partial, open(source, "rb") as src, open(partial, "wb") as dst:
            with tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=path, leave=False) as bar:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
        return target


class HubSource:
    """The five repos on the Hugging Face Hub, read with `token` (the gated DeepFloyd repo needs one)."""

    def __init__(self, token=None):
        self.token = token

    def __str__(self):
        return "the Hugging Face Hub"

    def list_files(self, repo) -> dict:
        with self._explained_errors(HUB_REPOS[repo]):
            return hub_list_files(HUB_REPOS[repo], self.token)

    def fetch(self, repo, path, repo_dir) -> Path:
        with self._explained_errors(HUB_REPOS[repo]):
            return hub_download_file(HUB_REPOS[repo], path, repo_dir, self.token)

    @contextmanager
    def _explained_errors(self, repo_id):
        try:
            yield
        except HfHubHTTPError as error:
            # Without a token the Hub answers 401 for a gated repo (huggingface_hub then raises
            # RepositoryNotFoundError); with one that has not accepted the licence, GatedRepoError.
            licence_missing = isinstance(error, GatedRepoError)
            if licence_missing or error.response.status_code in (401, 403):
                raise DownloadError(access_refused_message(repo_id, self.token is not None, licence_missing)) from error
            raise DownloadError(f"Fetching from {repo_id} failed: {error}\nRun the command again to resume.") from error


def access_refused_message(repo_id, token_set, licence_missing) -> str:
    """What to do when the Hub refuses a repo: for the gated DeepFloyd repo, a token of an account
    that accepted its licence."""
    url = f"{HUB_URL}/{repo_id}"
    if not token_set:
        cause = f"{repo_id} is a gated repo and no Hugging Face token is set (HF_TOKEN is empty)."
    elif licence_missing:
        cause = f"The account of the token in HF_TOKEN has not accepted the licence of the gated repo {repo_id}."
    else:
        cause = f"The Hub refused the token in HF_TOKEN for {repo_id}: it is invalid or expired, or its account has no access."
    return (
        f"{cause}\nTo fix it: accept the licence at {url} while logged in to the Hub, create a read token at "
        f"{HUB_URL}/settings/tokens and run again with HF_TOKEN=<that token>. HF_TOKEN must be a token of an "
        "account that accepted the licence."
    )


def hub_list_files(repo_id, token) -> dict:
    """Every file of a Hub repo with its size. Checks access first, so that a gated repo fails in
    seconds rather than after the other repos' gigabytes."""
    api = HfApi(token=token)
    api.auth_check(repo_id)
    return {
        item.path: SourceFile(item.size, item.lfs.sha256 if item.lfs else None)
        for item in api.list_repo_tree(repo_id, recursive=True)
        if isinstance(item, RepoFile)
    }


def hub_download_file(repo_id, path, repo_dir, token) -> Path:
    """Downloads one file to repo_dir/path. huggingface_hub keeps partial downloads under
    repo_dir/.cache and resumes them, and shows a progress bar."""
    return Path(hf_hub_download(repo_id, path, local_dir=repo_dir, token=token))


def read_source_json(source, repo, path):
    """A small JSON file of a source (a sharded checkpoint's index), fetched to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(source.fetch(repo, path, tmp).read_text())


# ---------------------------------------------------------------------------------------------
# Pickles to safetensors

PICKLE_EXTENSION = re.compile(r"\.bin(?=$|\.index)")


def is_pickle_checkpoint(name) -> bool:
    return name.endswith(".bin")


def is_pickle_index(name) -> bool:
    return ".bin.index" in name and name.endswith(".json")


def safetensors_name(name) -> str:
    """The name a converted pickle (or pickle index) gets: the one diffusers or transformers looks
    for. diffusion_pytorch_model[.fp16].bin -> diffusion_pytorch_model[.fp16].safetensors;
    pytorch_model[-0000k-of-0000n].bin -> model[-0000k-of-0000n].safetensors;
    pytorch_model.bin.index.json -> model.safetensors.index.json."""
    if name.startswith("pytorch_model"):
        name = name[len("pytorch_"):]
    return PICKLE_EXTENSION.sub(".safetensors", name, count=1)


def convert_checkpoint(bin_path) -> Path:
    """Converts one PyTorch pickle to safetensors next to it, with every tensor bit-identical
    (same dtype, shape and bytes), then deletes the pickle. Returns the new file."""
    bin_path = Path(bin_path)
    state_dict = _load_pickle(bin_path)
    target = bin_path.with_name(safetensors_name(bin_path.name))
    with written_atomically(target) as partial:
        # transformers refuses safetensors files without this metadata.
        save_file(_standalone_tensors(state_dict), partial, metadata={"format": "pt"})
        _check_identical(state_dict, partial, bin_path)
    bin_path.unlink()
    return target


def _load_pickle(bin_path) -> dict:
    try:
        # weights_only: the unpickler refuses anything but tensors and plain containers.
        state_dict = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConversionError(f"{bin_path} is not a readable PyTorch checkpoint ({error})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{bin_path} is not a flat dictionary of tensors, so it cannot be converted")
    return state_dict


def _standalone_tensors(state_dict) -> dict:
    """The tensors as safetensors can store them: contiguous, each with its own storage. Pickles
    keep tied weights (T5's shared.weight and encoder.embed_tokens.weight) as one storage, which
    safetensors refuses; every later user of a storage gets a copy, and both keys stay because
    the libraries expect both."""
    seen_storages, tensors = set(), {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        tensor = tensor.contiguous()
        tensors[name] = tensor.clone() if storage in seen_storages else tensor
        seen_storages.add(storage)
    return tensors


def _raw_bytes(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _check_identical(state_dict, safetensors_path, source):
    with safe_open(safetensors_path, framework="pt") as stored:
        if set(stored.keys()) != set(state_dict):
            raise ConversionError(f"Converting {source} changed its tensor names")
        for name, tensor in state_dict.items():
            copy = stored.get_tensor(name)
            # Bytes, not values: NaNs and signed zeros must survive too.
            if copy.dtype != tensor.dtype or copy.shape != tensor.shape or not torch.equal(_raw_bytes(copy), _raw_bytes(tensor)):
                raise ConversionError(f"Converting {source} changed tensor {name}")


def convert_index(index_path) -> Path:
    """Rewrites a pickle checkpoint's index for the converted shards, then deletes it."""
    index_path = Path(index_path)
    index = json.loads(index_path.read_text())
    index["weight_map"] = {key: safetensors_name(shard) for key, shard in index["weight_map"].items()}
    absent = sorted({shard for shard in index["weight_map"].values() if not (index_path.parent / shard).is_file()})
    if absent:
        # The loader prefers a safetensors index, so it must never point at shards that are not there.
        raise ConversionError(f"Cannot convert {index_path}: shards not converted yet: {', '.join(absent)}")
    target = index_path.with_name(safetensors_name(index_path.name))
    with written_atomically(target) as partial:
        partial.write_text(json.dumps(index, indent=2) + "\n")
    index_path.unlink()
    return target


def convert_pickles(paths, out=print):
    """Converts every pickle checkpoint among `paths`, then every pickle index (their shards first)."""
    for path in [p for p in paths if is_pickle_checkpoint(p.name)]:
        out(f"converting {path} to safetensors")
        convert_checkpoint(path)
    for path in [p for p in paths if is_pickle_index(p.name)]:
        convert_index(path)


# ---------------------------------------------------------------------------------------------
# The whole job


@dataclass(frozen=True)
class PlannedFile:
    repo: str
    path: str  # inside the repo
    source: SourceFile

    def destination(self, weights_dir) -> Path:
        return Path(weights_dir) / self.repo / self.path

    def is_done(self, weights_dir) -> bool:
        """Already fetched with the listed size, or already converted to safetensors. A converted
        file is only written under its name once complete and checked."""
        dest = self.destination(weights_dir)
        if dest.is_file():
            return dest.stat().st_size == self.source.size
        converts = is_pickle_checkpoint(dest.name) or is_pickle_index(dest.name)
        return converts and dest.with_name(safetensors_name(dest.name)).is_file()


def plan_files(source) -> list:
    """Lists and selects the files of every repo before anything large is fetched, so a refused
    or incomplete repo is reported at once."""
    plan = []
    for repo in HUB_REPOS:
        listing = source.list_files(repo)
        paths = select_repo_files(repo, listing, partial(read_source_json, source, repo))
        plan += [PlannedFile(repo, path, listing[path]) for path in paths]
    return plan


def describe_plan(plan, pending, source, weights_dir) -> str:
    """The files and total size per repo and overall, and what is left to fetch."""
    def summary(files):
        return f"{len(files):3d} files {format_size(sum(f.source.size for f in files)):>10}"

    lines = [f"Show-1 weights from {source} into {weights_dir}:"]
    for repo in HUB_REPOS:
        in_repo = [f for f in plan if f.repo == repo]
        to_fetch = [f for f in pending if f.repo == repo]
        lines.append(f"  {repo:22s}{summary(in_repo)}   to fetch:{summary(to_fetch)}")
        lines += [f"      {f.path} ({format_size(f.source.size)})" for f in to_fetch]
    lines.append(f"  {'total':22s}{summary(plan)}   to fetch:{summary(pending)}")
    return "\n".join(lines)


def check_disk_space(weights_dir, plan, pending):
    """Fails before fetching when the disk cannot hold the files plus one conversion at a time
    (a pickle and its safetensors copy coexist until the copy is checked)."""
    largest_pickle = max((f.source.size for f in plan if is_pickle_checkpoint(f.path)), default=0)
    needed = sum(f.source.size for f in pending) + largest_pickle
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


def drop_broken_files(weights_dir, out=print) -> bool:
    """When DIR has a manifest: True if every file still matches it (nothing to do); otherwise
    deletes the files that do not, and the manifest, so that they are fetched again."""
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
    if not problems:
        out(f"All {len(entries)} files in {weights_dir} match {manifest_path(weights_dir).name}: nothing to do.")
        return True
    for entry, problem in problems:
        out(f"{problem}: fetching it again")
        (Path(weights_dir) / entry.path).unlink(missing_ok=True)
    manifest_path(weights_dir).unlink()
    return False


def download_weights(weights_dir, source, out=print) -> Path:
    """Fills `weights_dir` with every file the cascade reads from `source`, converts pickles to
    safetensors and writes the manifest. Returns the manifest's path."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    if drop_broken_files(weights_dir, out):
        return manifest_path(weights_dir)
    plan = plan_files(source)
    pending = [f for f in plan if not f.is_done(weights_dir)]
    out(describe_plan(plan, pending, source, weights_dir))
    check_disk_space(weights_dir, plan, pending)
    for number, planned in enumerate(pending, 1):
        out(f"[{number}/{len(pending)}] {planned.repo}/{planned.path} ({format_size(planned.source.size)})")
        fetch_file(weights_dir, source, planned)
    destinations = [f.destination(weights_dir) for f in plan]
    convert_pickles([path for path in destinations if path.is_file()], out)
    total = sum(path.stat().st_size for path in required_files(weights_dir))
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing for the manifest") as bar:
        manifest = write_manifest(weights_dir, bar.update)
    out(f"Done: {weights_dir} holds every file the cascade reads; {manifest} lists them.")
    return manifest


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="script/download-weights",
        description="Download the Show-1 weights (only the files the cascade reads), convert PyTorch "
        "pickles to safetensors and write DIR/manifest.json. Safe to re-run: it resumes and skips "
        "what is already there. The DeepFloyd repo is gated: set HF_TOKEN (see README.md, 'Weights').",
    )
    parser.add_argument("weights_dir", nargs="?", type=Path, default=PROJECT_WEIGHTS_DIR,
                        help="where to put the weights (default: weights/ of this project)")
    parser.add_argument("--from", dest="local_dir", type=Path,
                        help="take the five repos from this folder (one sub-folder per repo) instead of the Hub")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """script/download-weights: exit status 0 on success, 1 with a message saying what to do."""
    args = _parse_args(argv)
    # get_token(): HF_TOKEN, else the token saved by `hf auth login`.
    source = LocalSource(args.local_dir) if args.local_dir else HubSource(get_token())
    try:
        download_weights(args.weights_dir, source)
    except (DownloadError, WeightsError) as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted. Run the same command again to resume.", file=sys.stderr)
        return 130
    return 0
