"""Every component the cascade reads, each declared once: the stage that uses it, its name there,
the published repo folder it comes from, what kind of thing it is and, for networks, the dtype it
runs in on a GPU.

Everything else derives from this table: the files the loader and the downloader look for
(show1.weights.layout), how each component is loaded (show1.weights.loading), which networks a
stage moves to the device when stages are offloaded (show1.pipeline), and the random-weight and
tiny-weight builders of the tests and benchmarks (bench/). Adding a network is one line here.

A weights folder holds one sub-folder per Hugging Face Hub repo, laid out exactly as published:

    weights/
      show-1-base/           T5 text encoder + tokenizer, keyframe UNet, scheduler
      show-1-interpolation/  interpolation UNet, scheduler
      IF-II-L-v1.0/          DeepFloyd IF stage II UNet, schedulers (gated repo)
      show-1-sr1/            video super-resolution 1 UNet, schedulers
      show-1-sr2/            video super-resolution 2 UNet, VAE, CLIP text encoder + tokenizer, scheduler

Only the components below are read: no T5 copies from the other repos, no safety checker,
watermarker or feature extractor.
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

# The stages in the order they run. Each id names the stage's module (show1/stages/<id>.py), its
# timing key and metric (stage_seconds.<id>) and its progress label.
STAGES = ("text", "keyframes", "interpolation", "first_frame", "sr1", "sr2")

# Local folder name -> Hub repo id.
HUB_REPOS = {
    "show-1-base": "showlab/show-1-base",
    "show-1-interpolation": "showlab/show-1-interpolation",
    "IF-II-L-v1.0": "DeepFloyd/IF-II-L-v1.0",
    "show-1-sr1": "showlab/show-1-sr1",
    "show-1-sr2": "showlab/show-1-sr2",
}


@dataclass(frozen=True)
class Kind:
    """What a component folder holds, and so which files it needs and how it is loaded.

    name: "diffusers model", "transformers model", "scheduler" or "tokenizer".
    config_files: files that must be there.
    weights_stem / pickle_stem: the stem of the weight files as the library names them in
        safetensors and in pickles ("" for components without weights).
    file_choices: alternative sets of files of which one must be there (tokenizers: the fast
        tokenizer file or the slow originals, converted on load).
    """

    name: str
    config_files: tuple = ()
    weights_stem: str = ""
    pickle_stem: str = ""
    file_choices: tuple = ()

    @property
    def has_weights(self) -> bool:
        return bool(self.weights_stem)


DIFFUSERS_MODEL = Kind("diffusers model", ("config.json",), "diffusion_pytorch_model", "diffusion_pytorch_model")
TRANSFORMERS_MODEL = Kind("transformers model", ("config.json",), "model", "pytorch_model")
SCHEDULER = Kind("scheduler", ("scheduler_config.json",))
T5_TOKENIZER = Kind("tokenizer", file_choices=(("tokenizer.json",), ("spiece.model",)))
CLIP_TOKENIZER = Kind("tokenizer", file_choices=(("tokenizer.json",), ("vocab.json", "merges.txt")))
TOKENIZER_OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Component:
    """One component folder of a published repo, as one stage uses it (`stage`.`name`)."""

    stage: str
    name: str
    repo: str
    folder: str
    kind: Kind
    serving_dtype: Optional[torch.dtype] = None  # networks only: the dtype it runs in on a GPU

    @property
    def key(self) -> str:
        """'sr1.unet': how messages, tools and manifests name the component."""
        return f"{self.stage}.{self.name}"

    @property
    def is_network(self) -> bool:
        return self.kind.has_weights


# The serving precision, decided by measurement (docs/fidelity.md, 'Half precision'): on a GPU
# every network runs in float16; layers that the model class keeps in float32 (T5's `wo`) stay
# float32, see show1.precision.
COMPONENTS = (
    Component("text", "t5", "show-1-base", "text_encoder", TRANSFORMERS_MODEL, torch.float16),
    Component("text", "t5_tokenizer", "show-1-base", "tokenizer", T5_TOKENIZER),
    Component("text", "clip", "show-1-sr2", "text_encoder", TRANSFORMERS_MODEL, torch.float16),
    Component("text", "clip_tokenizer", "show-1-sr2", "tokenizer", CLIP_TOKENIZER),
    Component("keyframes", "unet", "show-1-base", "unet", DIFFUSERS_MODEL, torch.float16),
    Component("keyframes", "scheduler", "show-1-base", "scheduler", SCHEDULER),
    Component("interpolation", "unet", "show-1-interpolation", "unet", DIFFUSERS_MODEL, torch.float16),
    Component("interpolation", "scheduler", "show-1-interpolation", "scheduler", SCHEDULER),
    Component("first_frame", "unet", "IF-II-L-v1.0", "unet", DIFFUSERS_MODEL, torch.float16),
    Component("first_frame", "scheduler", "IF-II-L-v1.0", "scheduler", SCHEDULER),
    Component("first_frame", "noising_scheduler", "IF-II-L-v1.0", "image_noising_scheduler", SCHEDULER),
    Component("sr1", "unet", "show-1-sr1", "unet", DIFFUSERS_MODEL, torch.float16),
    Component("sr1", "scheduler", "show-1-sr1", "scheduler", SCHEDULER),
    Component("sr1", "noising_scheduler", "show-1-sr1", "image_noising_scheduler", SCHEDULER),
    Component("sr2", "unet", "show-1-sr2", "unet", DIFFUSERS_MODEL, torch.float16),
    Component("sr2", "vae", "show-1-sr2", "vae", DIFFUSERS_MODEL, torch.float16),
    Component("sr2", "scheduler", "show-1-sr2", "scheduler", SCHEDULER),
)
NETWORKS = tuple(c for c in COMPONENTS if c.is_network)


def component(key) -> Component:
    """The component named `key` ('sr1.unet'); ValueError listing the names otherwise."""
    for c in COMPONENTS:
        if c.key == key:
            return c
    raise ValueError(f"No component {key!r}; the components are {', '.join(c.key for c in COMPONENTS)}")


class Components:
    """Loaded components by stage: `components.sr1.unet`, `components.text.t5_tokenizer`.

    Built from {Component: loaded object}; each stage's attribute is a namespace with one attribute
    per component of that stage: the stage's components, which its `run` receives first (the
    `parts` of show1/stages/*.py)."""

    def __init__(self, loaded: dict):
        self.loaded = dict(loaded)
        for stage in STAGES:
            parts = {c.name: obj for c, obj in self.loaded.items() if c.stage == stage}
            setattr(self, stage, SimpleNamespace(**parts))

    def __getitem__(self, key):
        """The object of the component named `key` ('sr1.unet')."""
        return self.loaded[component(key)]

    def networks(self, stage=None) -> list:
        """The loaded networks of one stage, or of all stages."""
        return [obj for c, obj in self.loaded.items() if c.is_network and stage in (None, c.stage)]

