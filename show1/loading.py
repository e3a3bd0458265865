"""Loading networks from published folders with strict checks and clear errors."""

import json
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import load_file

from .models import UNet3DConditionModel
from .weights import SHOW1_UNET_CLASS_NAMES, WeightsError, resolve_weight_files


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the network its config describes."""


def read_state_dict(files) -> dict:
    """Reads one weights file, or an index and its shards, without unpickling arbitrary objects."""
    state_dict = {}
    for path in files:
        if path.name.endswith(".json"):
            continue
        if path.suffix == ".safetensors":
            state_dict.update(load_file(path))
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return state_dict


def check_state_dict(model, state_dict, source):
    """Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected.keys() & state_dict.keys()
        if expected[k].shape != state_dict[k].shape
    )
    problems = [("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)]
    if any(items for _, items in problems):
        details = "; ".join(f"{label}: {', '.join(items[:10])}{' ...' if len(items) > 10 else ''}"
                            for label, items in problems if items)
        raise CheckpointMismatchError(f"{source} does not match its config ({details})")


def load_diffusers_model(cls, folder, dtype=None, device="cpu"):
    """Builds `cls` from `folder/config.json` and loads its weights strictly."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing")
    files = resolve_weight_files(folder, "diffusion_pytorch_model")
    if not files:
        raise WeightsError(f"No weights (diffusion_pytorch_model.safetensors or .bin) in {folder}")
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = cls.from_config(config)
    state_dict = read_state_dict(files)
    check_state_dict(model, state_dict, files[0])
    if dtype is None:
        dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    state_dict = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_empty:
        raise CheckpointMismatchError(f"{folder}: tensors not initialised by the checkpoint: {left_empty[:10]}")
    return model.eval()


# Classes a published model_index.json may name for the components the cascade reads. Anything
# else is refused rather than imported.
KNOWN_CLASSES = {
    **{name: UNet3DConditionModel for name in SHOW1_UNET_CLASS_NAMES},
    **{("diffusers", cls.__name__): cls for cls in (
        diffusers.UNet2DConditionModel, diffusers.AutoencoderKL,
        diffusers.DPMSolverMultistepScheduler, diffusers.DDPMScheduler,
    )},
    **{("transformers", cls.__name__): cls for cls in (
        transformers.T5EncoderModel, transformers.CLIPTextModel, transformers.T5Tokenizer,
        transformers.T5TokenizerFast, transformers.CLIPTokenizer, transformers.CLIPTokenizerFast,
    )},
}


def component_class(weights_dir, component):
    """The class that the repo's model_index.json names for a component, mapped to this project."""
    index_path = Path(weights_dir) / component.repo / "model_index.json"
    index = json.loads(index_path.read_text())
    name = tuple(index.get(component.folder) or ())
    if name not in KNOWN_CLASSES:
        raise WeightsError(f"{index_path} names {name or 'nothing'} for {component.folder!r}; expected one of "
                           f"{sorted(KNOWN_CLASSES)}")
    return KNOWN_CLASSES[name]


def load_transformers_model(cls, folder, dtype, device):
    model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointMismatchError(f"{folder} does not match its config: {problems}")
    return model.to(device).eval()


def scheduler_from_config(cls, config):
    scheduler = cls.from_config(config)
    if "final_sigmas_type" in scheduler.config:
        # The reference's DPM-Solver ends its last step at the smallest trained noise level, not at 0.
        scheduler = cls.from_config(scheduler.config, final_sigmas_type="sigma_min")
    return scheduler


def load_scheduler(cls, folder):
    return scheduler_from_config(cls, cls.load_config(folder))
