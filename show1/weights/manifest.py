"""The weights manifest: path, size and sha256 of every file the cascade reads, the dtypes of the
tensors in each checkpoint, and the precision the folder was stored in (see
show1.weights.preparation.download). Its format is written and read here only.

`script/download-weights` writes DIR/manifest.json once the weights are complete. Two checks read it:
- `verify_manifest` (script/verify-weights) re-hashes every file: slow on 25+ GB, catches any change;
- `check_manifest_sizes` (every server start) only compares sizes: cheap, catches missing and
  truncated files, which is what an interrupted copy or a full disk leaves behind.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..files import written_atomically
from .layout import DOWNLOAD_HINT, WeightsError, is_checkpoint, required_files, stored_dtypes

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: dtypes and precision recorded
REPAIR_HINT = "Run `script/download-weights {weights_dir}` to fetch them again (only broken files are re-fetched)."


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative to the weights folder, "/"-separated
    size: int
    sha256: str
    dtypes: tuple = ()  # of a checkpoint's tensors, e.g. ("float16", "float32"); () for other files


def file_sha256(path, on_bytes=None) -> str:
    """The sha256 of a file, read in chunks; `on_bytes(n)` is told how much was read (progress)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


def manifest_path(weights_dir) -> Path:
    return Path(weights_dir) / MANIFEST_NAME


def checkpoint_dtypes(path) -> tuple:
    """The distinct dtypes of the tensors in a checkpoint file, sorted; () for other files. No
    tensor data is read (show1.weights.layout.stored_dtypes)."""
    return dtype_names(stored_dtypes(path)) if is_checkpoint(Path(path).name) else ()


def dtype_names(dtypes) -> tuple:
    """The distinct dtypes, sorted, as manifests and messages write them: ("float16", "float32")."""
    return tuple(sorted({str(dtype).removeprefix("torch.") for dtype in dtypes}))


def _manifest_entry(weights_dir, path, on_bytes):
    entry = {
        "path": path.relative_to(weights_dir).as_posix(), "size": path.stat().st_size, "sha256": file_sha256(path, on_bytes),
    }
    dtypes = checkpoint_dtypes(path)
    return {**entry, "dtypes": list(dtypes)} if dtypes else entry


def write_manifest(weights_dir, on_bytes=None, precision=None) -> Path:
    """Hashes every file the cascade reads and writes DIR/manifest.json, with the `precision` the
    networks are stored in ("serving" or "published", None when unknown). Raises WeightsError if
    something the cascade needs is missing, so a manifest always describes a complete folder."""
    weights_dir = Path(weights_dir)
    entries = [_manifest_entry(weights_dir, path, on_bytes) for path in required_files(weights_dir)]
    text = json.dumps({"version": MANIFEST_VERSION, "precision": precision, "files": entries}, indent=1) + "\n"
    with written_atomically(manifest_path(weights_dir)) as partial:
        partial.write_text(text)
    return manifest_path(weights_dir)


def manifest_precision(weights_dir):
    """The precision DIR/manifest.json records for the networks: "serving", "published" or None."""
    return json.loads(manifest_path(weights_dir).read_text()).get("precision")


def read_manifest(weights_dir) -> list:
    """The entries of DIR/manifest.json; WeightsError if it is absent or malformed."""
    path = manifest_path(weights_dir)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist. " + DOWNLOAD_HINT.format(weights_dir=weights_dir) + " It writes the manifest.")
    try:
        data = json.loads(path.read_text())
        if data["version"] != MANIFEST_VERSION:
            raise ValueError(f"version {data['version']!r}, expected {MANIFEST_VERSION}")
        entries = [
            ManifestEntry(str(e["path"]), int(e["size"]), str(e["sha256"]), tuple(map(str, e.get("dtypes", ()))))
            for e in data["files"]
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"{path} is not a valid weights manifest ({error}). " + DOWNLOAD_HINT.format(weights_dir=weights_dir)) from error
    for entry in entries:
        _check_entry_path(path, entry)
    return entries


def _check_entry_path(manifest, entry):
    # The manifest names files to read inside the weights folder and nothing outside it.
    relative = Path(entry.path)
    if relative.is_absolute() or ".." in relative.parts or not entry.path:
        raise WeightsError(f"{manifest} lists {entry.path!r}, which is not a path inside the weights folder")


def _size_problem(weights_dir, entry):
    """A description of what is wrong with the entry's file judging by its size, or None."""
    path = Path(weights_dir) / entry.path
    if not path.is_file():
        return f"{entry.path}: missing"
    size = path.stat().st_size
    if size < entry.size:
        return f"{entry.path}: truncated ({size} of {entry.size} bytes)"
    if size > entry.size:
        return f"{entry.path}: wrong size ({size} bytes, expected {entry.size})"
    return None


def _raise_problems(weights_dir, problems):
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise WeightsError(
            f"The Show-1 weights in {weights_dir} do not match {manifest_path(weights_dir)}:\n{listed}\n"
            + REPAIR_HINT.format(weights_dir=weights_dir)
        )


def check_manifest_sizes(weights_dir) -> None:
    """The cheap start-up check: every file listed in DIR/manifest.json exists with its size.
    Raises WeightsError naming every missing or truncated file. Does nothing without a manifest
    (a folder assembled by hand, such as the test fixtures)."""
    if not manifest_path(weights_dir).is_file():
        return
    entries = read_manifest(weights_dir)
    _raise_problems(weights_dir, [p for p in (_size_problem(weights_dir, e) for e in entries) if p])


def find_problems(weights_dir, entries, on_bytes=None) -> list:
    """(entry, description) for every manifest entry whose file is missing, has the wrong size or
    has another sha256."""
    problems = []
    for entry in entries:
        problem = _size_problem(weights_dir, entry)
        if problem is None and file_sha256(Path(weights_dir) / entry.path, on_bytes) != entry.sha256:
            problem = f"{entry.path}: altered (sha256 differs from the manifest)"
        if problem:
            problems.append((entry, problem))
    return problems


def verify_manifest(weights_dir, on_bytes=None) -> list:
    """The full check: sizes and hashes of every file in DIR/manifest.json, and the manifest covers
    every file the cascade reads. Returns the entries; raises WeightsError naming every problem."""
    entries = read_manifest(weights_dir)
    _raise_problems(weights_dir, [problem for _, problem in find_problems(weights_dir, entries, on_bytes)])
    listed = {e.path for e in entries}
    needed = [p.relative_to(weights_dir).as_posix() for p in required_files(weights_dir)]
    _raise_problems(weights_dir, [f"{p}: read by the cascade but not in the manifest" for p in needed if p not in listed])
    return entries
