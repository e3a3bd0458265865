"""The weights layout: which published repos and files the cascade reads, and clear errors when
something is missing.

A weights folder holds one sub-folder per Hugging Face Hub repo, laid out exactly as published:

    weights/
      show-1-base/           T5 text encoder + tokenizer, keyframe UNet, scheduler
      show-1-interpolation/  interpolation UNet, scheduler
      IF-II-L-v1.0/          DeepFloyd IF stage II UNet, schedulers (gated repo)
      show-1-sr1/            video super-resolution 1 UNet, schedulers
      show-1-sr2/            video super-resolution 2 UNet, VAE, CLIP text encoder + tokenizer, scheduler

Only the components below are read: no T5 copies from the other repos, no safety checker,
watermarker or feature extractor.

Each network declares its serving dtype: the dtype it runs in on a GPU. script/download-weights
stores it in that dtype and the loader reads it straight into it (on the CPU it is upcast to
float32). Layers that the model class keeps in float32 (T5's `wo`) stay float32, see
show1.precision.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DOWNLOAD_HINT = "Run `script/download-weights {weights_dir}` to fetch the weights (see README.md, 'Weights')."

# Local folder name -> Hub repo id.
HUB_REPOS = {
    "show-1-base": "showlab/show-1-base",
    "show-1-interpolation": "showlab/show-1-interpolation",
    "IF-II-L-v1.0": "DeepFloyd/IF-II-L-v1.0",
    "show-1-sr1": "showlab/show-1-sr1",
    "show-1-sr2": "showlab/show-1-sr2",
}

# The published model_index.json files name the UNet class of a package this project replaces.
SHOW1_UNET_CLASS_NAMES = {("showone.models.unet_3d_condition", "UNet3DConditionModel")}


@dataclass(frozen=True)
class Component:
    """One sub-folder of a repo: the files that must be there and, for networks, the weights' stem
    and the dtype the network runs in on a GPU."""

    repo: str
    folder: str
    config_files: tuple
    weights_stem: str = ""  # "" for components without weights (schedulers, tokenizers)
    serving_dtype: Optional[torch.dtype] = None  # None for components without weights

    def path(self, weights_dir) -> Path:
        return Path(weights_dir) / self.repo / self.folder


def _scheduler(repo, folder="scheduler"):
    return Component(repo, folder, ("scheduler_config.json",))


def _diffusers_model(repo, folder, serving_dtype):
    return Component(repo, folder, ("config.json",), "diffusion_pytorch_model", serving_dtype)


def _transformers_model(repo, folder, serving_dtype):
    return Component(repo, folder, ("config.json",), "model", serving_dtype)


# The serving precision, decided by measurement: on a GPU every network runs in float16.
COMPONENTS = {
    "text_encoder": _transformers_model("show-1-base", "text_encoder", torch.float16),
    "tokenizer": Component("show-1-base", "tokenizer", ()),  # spiece.model or tokenizer.json, see below
    "keyframes_unet": _diffusers_model("show-1-base", "unet", torch.float16),
    "keyframes_scheduler": _scheduler("show-1-base"),
    "interpolation_unet": _diffusers_model("show-1-interpolation", "unet", torch.float16),
    "interpolation_scheduler": _scheduler("show-1-interpolation"),
    "first_frame_unet": _diffusers_model("IF-II-L-v1.0", "unet", torch.float16),
    "first_frame_scheduler": _scheduler("IF-II-L-v1.0"),
    "first_frame_noising_scheduler": _scheduler("IF-II-L-v1.0", "image_noising_scheduler"),
    "sr1_unet": _diffusers_model("show-1-sr1", "unet", torch.float16),
    "sr1_scheduler": _scheduler("show-1-sr1"),
    "sr1_noising_scheduler": _scheduler("show-1-sr1", "image_noising_scheduler"),
    "sr2_unet": _diffusers_model("show-1-sr2", "unet", torch.float16),
    "sr2_vae": _diffusers_model("show-1-sr2", "vae", torch.float16),
    "sr2_text_encoder": _transformers_model("show-1-sr2", "text_encoder", torch.float16),
    "sr2_tokenizer": Component("show-1-sr2", "tokenizer", ()),
    "sr2_scheduler": _scheduler("show-1-sr2"),
}

# Tokenizers: either the fast tokenizer file or the slow originals (converted on load).
TOKENIZER_FILES = {
    "tokenizer": (("tokenizer.json",), ("spiece.model",)),
    "sr2_tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
}
TOKENIZER_OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class WeightsError(FileNotFoundError):
    """A weights folder is missing, incomplete or does not match its manifest."""


def _weight_file_candidates(stem):
    """Weight file names in order of preference: safetensors before pickles, fp16 before full."""
    pickle_stem = "pytorch_model" if stem == "model" else stem
    names = []
    for ext, base in (("safetensors", stem), ("bin", pickle_stem)):
        names += [f"{base}.fp16.{ext}", f"{base}.{ext}", f"{base}.{ext}.index.fp16.json", f"{base}.{ext}.index.json"]
    return names


def pick_weight_files(names, stem, read_index) -> list:
    """The weight files a network is loaded from, chosen among `names` (the file names in its folder):
    one file, or an index followed by its shards. `read_index(name)` returns an index's parsed JSON.
    Works on a folder on disk and on a repo listing alike, so downloading and loading agree."""
    for name in _weight_file_candidates(stem):
        if name not in names:
            continue
        if ".index" not in name:
            return [name]
        return [name] + sorted(set(read_index(name)["weight_map"].values()))
    return []


def component_files(key, names, read_index) -> tuple:
    """(found, missing): the names of the files the cascade reads from component `key`'s folder,
    chosen among `names`, and descriptions of the ones that are absent."""
    component = COMPONENTS[key]
    found, missing = [], []
    for name in component.config_files:
        (found if name in names else missing).append(name)
    if key in TOKENIZER_FILES:
        choice = next((c for c in TOKENIZER_FILES[key] if all(n in names for n in c)), None)
        if choice is None:
            missing.append(" or ".join("+".join(c) for c in TOKENIZER_FILES[key]))
        else:
            found += [n for n in choice + TOKENIZER_OPTIONAL_FILES if n in names]
    # Without a config the network cannot be built, so its weights are not looked for.
    if component.weights_stem and "config.json" in names:
        weight_files = pick_weight_files(names, component.weights_stem, read_index)
        if not weight_files:
            missing.append(f"{component.weights_stem}.safetensors (or .bin)")
        for name in weight_files:
            (found if name in names else missing).append(name)
    return found, missing


def _file_names(folder) -> set:
    folder = Path(folder)
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


def _index_reader(folder):
    return lambda name: json.loads((Path(folder) / name).read_text())


def resolve_weight_files(component_dir, stem) -> list:
    """The weight files a network is loaded from: one file, or an index and its shards.
    `stem` is "diffusion_pytorch_model" for diffusers models and "model" for transformers ones."""
    component_dir = Path(component_dir)
    names = pick_weight_files(_file_names(component_dir), stem, _index_reader(component_dir))
    return [component_dir / name for name in names]


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
    for key, component in COMPONENTS.items():
        if component.repo in absent_repos:
            continue
        folder = component.path(weights_dir)
        if not folder.is_dir():
            missing.append(folder)
            continue
        found, absent = component_files(key, _file_names(folder), _index_reader(folder))
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
