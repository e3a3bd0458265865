"""Fetching the Show-1 weights: only the files the cascade reads, from the Hugging Face Hub or from a
local copy of the five repos, stored as safetensors in the dtype each network runs in, with a manifest.

The steps, each safe to interrupt and re-run:
1. list each repo and choose its files with the loader's own rules (show1.weights.component_files),
   and compute each checkpoint's size once converted (printed before anything large is fetched);
2. fetch the files that are not there yet (size checked, sha256 too where the Hub publishes it);
3. store each checkpoint as `.safetensors` in its network's serving dtype (show1.weights.Component,
   float32 modules of the class kept), check every tensor equals the published one cast to that
   dtype, delete a replaced `.bin`; with --keep-dtypes, only pickles are converted, bit-identically;
4. hash every file the cascade reads into DIR/manifest.json, with each checkpoint's dtypes.
A folder whose manifest still verifies, in the same precision, is left alone.
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .loading import class_in_model_index, serving_dtype_rule, tensor_dtype_rule
from .manifest import (
    PROJECT_WEIGHTS_DIR,
    dtype_names,
    file_sha256,
    find_problems,
    format_size,
    manifest_path,
    manifest_precision,
    read_manifest,
    write_manifest,
    written_atomically,
)
from .random_weights import build_network
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
# Checkpoints to safetensors, in the dtypes the networks run in

# What the folder stores: every network in its serving dtype (show1.weights.Component.serving_dtype,
# with the float32 modules of its class), or every tensor in the dtype it is published in.
SERVING, PUBLISHED = "serving", "published"

# Written into each converted file, so that a re-run knows which fetched file it came from.
CONVERTED_FROM, CONVERTED_FROM_SIZE, PRECISION = "show1.converted_from", "show1.converted_from_size", "show1.precision"

PICKLE_EXTENSION = re.compile(r"\.bin(?=$|\.index)")


def is_pickle_checkpoint(name) -> bool:
    return name.endswith(".bin")


def is_checkpoint(name) -> bool:
    """A file of tensors (not an index, which only names its shards)."""
    return name.endswith((".bin", ".safetensors"))


def is_pickle_index(name) -> bool:
    return ".bin.index" in name and name.endswith(".json")


def safetensors_name(name) -> str:
    """The name a converted pickle (or pickle index) gets: the one diffusers or transformers looks
    for. diffusion_pytorch_model[.fp16].bin -> diffusion_pytorch_model[.fp16].safetensors;
    pytorch_model[-0000k-of-0000n].bin -> model[-0000k-of-0000n].safetensors;
    pytorch_model.bin.index.json -> model.safetensors.index.json. Safetensors keep their name."""
    if name.startswith("pytorch_model"):
        name = name[len("pytorch_"):]
    return PICKLE_EXTENSION.sub(".safetensors", name, count=1)


def keep_dtype(name, stored_dtype):
    return stored_dtype


def convert_checkpoint(path, dtype_of=keep_dtype, out=None) -> Path:
    """Stores the checkpoint at `path` (a pickle or safetensors) as safetensors under the name the
    loaders look for, each tensor cast to dtype_of(name, stored_dtype), and checks that every
    stored tensor equals the source's tensor cast to that dtype. Then deletes a pickle. A
    safetensors file already in those dtypes is left as published. Returns the new file."""
    path = Path(path)
    state_dict = read_checkpoint(path)
    dtypes = {name: dtype_of(name, tensor.dtype) for name, tensor in state_dict.items()}
    unchanged = all(tensor.dtype == dtypes[name] for name, tensor in state_dict.items())
    target = path.with_name(safetensors_name(path.name))
    if target == path and unchanged:
        return target
    if out:
        out(f"converting {path} to safetensors ({' + '.join(dtype_names(dtypes.values()))})")
    # A file whose dtypes are all as published serves both precisions.
    precision = PUBLISHED if unchanged else SERVING
    metadata = {"format": "pt", **converted_from(path), PRECISION: precision}
    with written_atomically(target) as partial:
        # transformers refuses safetensors files without the "format" metadata.
        save_file(standalone_tensors({name: t.to(dtypes[name]) for name, t in state_dict.items()}), partial, metadata=metadata)
        _check_converted(state_dict, dtypes, partial, path)
    if target != path:
        path.unlink()
    return target


def read_checkpoint(path) -> dict:
    """The tensors of a pickle or safetensors file, memory-mapped (read when first used)."""
    if Path(path).suffix == ".safetensors":
        return load_file(path)
    return _load_pickle(path)


def conversion_record(path) -> dict:
    """The metadata a converted safetensors file carries ({} for a file as published)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # a truncated or foreign file: it is fetched again
        return {}
    return {k: v for k, v in metadata.items() if k in (CONVERTED_FROM, CONVERTED_FROM_SIZE, PRECISION)}


def converted_from(path) -> dict:
    """Which fetched file a conversion of `path` stems from: `path` itself, or, when `path` is
    already a conversion (published dtypes now stored in serving dtypes), the file it came from."""
    record = conversion_record(path)
    if CONVERTED_FROM in record:
        return {CONVERTED_FROM: record[CONVERTED_FROM], CONVERTED_FROM_SIZE: record[CONVERTED_FROM_SIZE]}
    return {CONVERTED_FROM: Path(path).name, CONVERTED_FROM_SIZE: str(Path(path).stat().st_size)}


def _load_pickle(bin_path) -> dict:
    try:
        # weights_only: the unpickler refuses anything but tensors and plain containers.
        state_dict = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConversionError(f"{bin_path} is not a readable PyTorch checkpoint ({error})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{bin_path} is not a flat dictionary of tensors, so it cannot be converted")
    return state_dict


def standalone_tensors(state_dict) -> dict:
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


def _check_converted(state_dict, dtypes, safetensors_path, source):
    """Every stored tensor has its target dtype and the bytes of the source tensor cast to it."""
    with safe_open(safetensors_path, framework="pt") as stored:
        if set(stored.keys()) != set(state_dict):
            raise ConversionError(f"Converting {source} changed its tensor names")
        for name, tensor in state_dict.items():
            copy, expected = stored.get_tensor(name), tensor.to(dtypes[name])
            # Bytes, not values: NaNs and signed zeros must survive too.
            same = copy.dtype == expected.dtype and copy.shape == expected.shape
            if not same or not torch.equal(_raw_bytes(copy), _raw_bytes(expected)):
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


def network_dtype_rule(weights_dir, component, precision):
    """rule(name, stored_dtype) of the dtypes a network's checkpoint is stored in."""
    return serving_dtype_rule(weights_dir, component) if precision == SERVING else keep_dtype


def current_file(path) -> Path:
    """A fetched file, or what it was converted to."""
    return path if path.is_file() else path.with_name(safetensors_name(path.name))


def convert_networks(weights_dir, plan, precision, out=print):
    """Stores every network's checkpoints as safetensors in the dtypes of `precision`, then
    rewrites the pickle indexes for their converted shards."""
    for component in COMPONENTS.values():
        if not component.weights_stem:
            continue
        prefix = component.folder + "/"
        paths = [f.destination(weights_dir) for f in plan if f.repo == component.repo and f.path.startswith(prefix)]
        dtype_of = network_dtype_rule(weights_dir, component, precision)
        for path in [p for p in paths if is_checkpoint(p.name)]:
            convert_checkpoint(current_file(path), dtype_of, out)
        for path in [p for p in paths if is_pickle_index(p.name) and p.is_file()]:
            convert_index(path)


# ---------------------------------------------------------------------------------------------
# Sizes after conversion, known before fetching


def network_tensors(class_name, config) -> dict:
    """{name: tensor} of a network of the class a model_index.json names, built from its config
    on the meta device (shapes and dtypes, no data)."""
    with torch.device("meta"):
        return build_network(class_name, config).state_dict()


def safetensors_size(tensors, dtype_of) -> int:
    """The size of a safetensors file holding `tensors` cast by dtype_of: the data plus a header
    estimated as safetensors writes it (compact JSON of dtypes, shapes and offsets)."""
    # The metadata of a converted file, with a typical file name and size.
    metadata = {"format": "pt", CONVERTED_FROM: "x" * 40, CONVERTED_FROM_SIZE: "0" * 11, PRECISION: SERVING}
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * dtype_of(name, tensor.dtype).itemsize
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return 8 + len(json.dumps(header, separators=(",", ":"))) + offset


def serving_sizes(source, repo, paths) -> dict:
    """{path: size} of the repo's checkpoint files once stored in their serving dtypes, computed
    from each network's config (built on the meta device) and, for shards, the index: the exact
    tensor bytes plus an estimated header. Only small JSON files are fetched for this."""
    model_index = read_source_json(source, repo, "model_index.json")
    sizes = {}
    for component in COMPONENTS.values():
        if component.repo != repo or not component.weights_stem:
            continue
        prefix = component.folder + "/"
        cls = class_in_model_index(model_index, component.folder, f"{repo}/model_index.json")
        class_name = tuple(model_index[component.folder])
        tensors = network_tensors(class_name, read_source_json(source, repo, prefix + "config.json"))
        dtype_of = tensor_dtype_rule(cls, component.serving_dtype)
        for path, names in _tensors_per_file(source, repo, [p for p in paths if p.startswith(prefix)], tensors).items():
            sizes[path] = safetensors_size({name: tensors[name] for name in names}, dtype_of)
    return sizes


def _tensors_per_file(source, repo, paths, tensors) -> dict:
    """{checkpoint path: names of its tensors}: all of them for a single file, the index's
    weight map for shards."""
    checkpoints = [p for p in paths if is_checkpoint(p)]
    indexes = [p for p in paths if p.endswith(".json") and ".index" in p]
    if not indexes:
        return {checkpoints[0]: list(tensors)}
    folder = indexes[0].rsplit("/", 1)[0] + "/"
    weight_map = read_source_json(source, repo, indexes[0])["weight_map"]
    return {path: [n for n, shard in weight_map.items() if folder + shard == path and n in tensors] for path in checkpoints}


# ---------------------------------------------------------------------------------------------
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
        "what is already there. The DeepFloyd repo is gated: set HF_TOKEN (see README.md, 'Weights').",
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
