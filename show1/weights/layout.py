"""Where a weights folder keeps each component's files, what they are called, and which dtypes a
checkpoint file stores.

The file-naming rules live here in both directions: which files a loader picks in a folder or in a
repo listing (fp16 variants first, safetensors before pickles, an index with all its shards), and
which name a file gets when written (tiny weights) or converted (a pickle stored as safetensors).
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..components import COMPONENTS, HUB_REPOS, TOKENIZER_OPTIONAL_FILES

DOWNLOAD_HINT = "Run `script/download-weights {weights_dir}` to fetch the weights (see docs/weights.md)."


class WeightsError(FileNotFoundError):
    """A weights folder is missing, incomplete or does not match its manifest."""


def component_dir(weights_dir, component) -> Path:
    return Path(weights_dir) / component.repo / component.folder


# File names

PICKLE_EXTENSION = re.compile(r"\.bin(?=$|\.index)")


def weights_file_name(kind, file_format, shard=None, shards=1, variant=None) -> str:
    """The name a library gives a `kind` network's weights in `file_format` ("safetensors" or
    "bin"): the single file, or shard `shard` of `shards` (numbered from 1); `variant` ("fp16")
    names a second copy in another precision."""
    stem = kind.weights_stem if file_format == "safetensors" else kind.pickle_stem
    if variant:
        stem = f"{stem}.{variant}"
    if shard is None:
        return f"{stem}.{file_format}"
    return f"{stem}-{shard:05d}-of-{shards:05d}.{file_format}"


def index_file_name(kind, file_format) -> str:
    """The name of the index of a sharded `kind` checkpoint."""
    return weights_file_name(kind, file_format) + ".index.json"


def weight_file_candidates(kind) -> list:
    """A network's weight file names in order of preference: safetensors before pickles, fp16
    before full precision, a single file before an index."""
    names = []
    for file_format in ("safetensors", "bin"):
        single = weights_file_name(kind, file_format)
        names += [weights_file_name(kind, file_format, variant="fp16"), single,
                  f"{single}.index.fp16.json", f"{single}.index.json"]
    return names


def safetensors_name(name) -> str:
    """The name a converted pickle (or pickle index) gets: the one diffusers or transformers looks
    for. diffusion_pytorch_model[.fp16].bin -> diffusion_pytorch_model[.fp16].safetensors;
    pytorch_model[-0000k-of-0000n].bin -> model[-0000k-of-0000n].safetensors;
    pytorch_model.bin.index.json -> model.safetensors.index.json. Safetensors keep their name."""
    if name.startswith("pytorch_model"):
        name = name[len("pytorch_"):]
    return PICKLE_EXTENSION.sub(".safetensors", name, count=1)


def is_checkpoint(name) -> bool:
    """A file of tensors (not an index, which only names its shards)."""
    return name.endswith((".bin", ".safetensors"))


def is_pickle_index(name) -> bool:
    return ".bin.index" in name and name.endswith(".json")


# safetensors' dtype names -> torch's.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


def stored_dtypes(path) -> list:
    """The dtype of every tensor in a checkpoint file, in the file's order, without reading tensor
    data: from a safetensors header, or from a pickle opened as a memory map."""
    if Path(path).suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return [SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()] for name in f.keys()]
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [tensor.dtype for tensor in tensors.values()]


# Which files a component needs


def pick_weight_files(names, kind, read_index) -> list:
    """The weight files a `kind` network is loaded from, chosen among `names` (the file names in
    its folder): one file, or an index followed by its shards. `read_index(name)` returns an
    index's parsed JSON. Works on a folder on disk and on a repo listing alike, so downloading and
    loading agree."""
    for name in weight_file_candidates(kind):
        if name not in names:
            continue
        if ".index" not in name:
            return [name]
        return [name] + sorted(set(read_index(name)["weight_map"].values()))
    return []


def component_files(component, names, read_index) -> tuple:
    """(found, missing): the names of the files the cascade reads from `component`'s folder,
    chosen among `names`, and descriptions of the ones that are absent."""
    kind = component.kind
    found, missing = [], []
    for name in kind.config_files:
        (found if name in names else missing).append(name)
    if kind.file_choices:
        choice = next((c for c in kind.file_choices if all(n in names for n in c)), None)
        if choice is None:
            missing.append(" or ".join("+".join(c) for c in kind.file_choices))
        else:
            found += [n for n in choice + TOKENIZER_OPTIONAL_FILES if n in names]
    # Without a config the network cannot be built, so its weights are not looked for.
    if kind.has_weights and "config.json" in names:
        weight_files = pick_weight_files(names, kind, read_index)
        if not weight_files:
            missing.append(f"{weights_file_name(kind, 'safetensors')} (or .bin)")
        for name in weight_files:
            (found if name in names else missing).append(name)
    return found, missing


def _file_names(folder) -> set:
    folder = Path(folder)
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


def _index_reader(folder):
    return lambda name: json.loads((Path(folder) / name).read_text())


def resolve_weight_files(folder, kind) -> list:
    """The weight files a `kind` network in `folder` is loaded from: one file, or an index and
    its shards."""
    folder = Path(folder)
    return [folder / name for name in pick_weight_files(_file_names(folder), kind, _index_reader(folder))]


def required_files(weights_dir) -> list:
    """Every file the cascade reads, as paths under weights_dir. Raises WeightsError naming
    everything that is missing."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise WeightsError(f"The Show-1 weights folder {weights_dir} does not exist. " + DOWNLOAD_HINT.format(weights_dir=weights_dir))
    files, missing = [], []
    absent_repos = {repo for repo in HUB_REPOS if not (weights_dir / repo).is_dir()}
    missing += [weights_dir / repo for repo in HUB_REPOS if repo in absent_repos]
    for repo in [r for r in HUB_REPOS if r not in absent_repos]:
        path = weights_dir / repo / "model_index.json"
        (files if path.is_file() else missing).append(path)
    for component in COMPONENTS:
        if component.repo in absent_repos:
            continue
        folder = component_dir(weights_dir, component)
        if not folder.is_dir():
            missing.append(folder)
            continue
        found, absent = component_files(component, _file_names(folder), _index_reader(folder))
        files += [folder / name for name in found]
        missing += [folder / name for name in absent]
    if missing:
        raise WeightsError(_missing_message(weights_dir, missing))
    return files


def _missing_message(weights_dir, missing):
    shown = "\n".join(f"  - {p}" for p in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    return (
        f"The Show-1 weights in {weights_dir} are incomplete; missing:\n{shown}{more}\n"
        + DOWNLOAD_HINT.format(weights_dir=weights_dir)
    )
