"""Loading each component from a published folder, networks with strict checks and clear errors."""

import json
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import safe_open

from ..attention import use_padded_attention
from ..components import DIFFUSERS_MODEL
from ..models import UNet3DConditionModel
from ..precision import tensor_dtype_rule
from .layout import WeightsError, component_dir, resolve_weight_files, stored_dtypes


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the network its config describes."""


def checkpoint_files(files) -> list:
    """The files that hold tensors: an index (.json) only names its shards."""
    return [path for path in files if not path.name.endswith(".json")]


def read_state_dict(files, device="cpu", dtype_of=None) -> dict:
    """Reads one weights file, or an index and its shards, without unpickling arbitrary objects.
    Tensors are read one at a time, straight onto `device`, and cast there to `dtype_of(name,
    stored_dtype)` when given. A tensor whose dtype does not change is the file's memory map on
    the CPU, so nothing is copied and the bytes are read once, when first used."""
    state_dict = {}
    for path in checkpoint_files(files):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt", device=str(device)) as f:
                state_dict.update(_cast_each(((name, f.get_tensor(name)) for name in f.keys()), dtype_of))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state_dict.update(_cast_each(((name, t.to(device)) for name, t in tensors.items()), dtype_of))
    return state_dict


def _cast_each(named_tensors, dtype_of):
    for name, tensor in named_tensors:
        yield name, tensor if dtype_of is None else tensor.to(dtype_of(name, tensor.dtype))


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


def stored_float_dtype(files):
    """The dtype of the first floating-point tensor stored in a checkpoint; no tensor data is read."""
    for path in checkpoint_files(files):
        dtype = next((d for d in stored_dtypes(path) if d.is_floating_point), None)
        if dtype:
            return dtype
    raise CheckpointMismatchError(f"{files[0]} holds no floating-point tensor")


def build_network(cls, config):
    """A `cls` network built at `config` (default initialisation, on the current default device)."""
    if issubclass(cls, transformers.PreTrainedModel):
        return cls(cls.config_class.from_dict(config))
    network = cls.from_config(config)
    if cls is diffusers.UNet2DConditionModel:
        # IF-II (first_frame) attends like the Show-1 UNets, which pad their heads themselves.
        use_padded_attention(network)
    return network


def load_diffusers_model(cls, folder, dtype=None, device="cpu"):
    """Builds `cls` from `folder/config.json` on the meta device and loads its weights strictly,
    each tensor read straight onto `device` in the dtype it runs in there (dtype None: as stored)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing")
    files = resolve_weight_files(folder, DIFFUSERS_MODEL)
    if not files:
        raise WeightsError(f"No weights (diffusion_pytorch_model.safetensors or .bin) in {folder}")
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = build_network(cls, config)
    if dtype is None:
        dtype = stored_float_dtype(files)
    state_dict = read_state_dict(files, device, tensor_dtype_rule(cls, dtype))
    check_state_dict(model, state_dict, files[0])
    # assign=True: the model takes the loaded tensors as its parameters, with no second copy.
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_empty:
        raise CheckpointMismatchError(f"{folder}: tensors not initialised by the checkpoint: {left_empty[:10]}")
    return model.eval()


# Classes a published model_index.json may name for the components the cascade reads. Anything
# else is refused rather than imported.
KNOWN_CLASSES = {
    # The published model_index.json files name the Show-1 UNet of a package this project replaces.
    ("showone.models.unet_3d_condition", "UNet3DConditionModel"): UNet3DConditionModel,
    **{("diffusers", cls.__name__): cls for cls in (
        diffusers.UNet2DConditionModel, diffusers.AutoencoderKL,
        diffusers.DPMSolverMultistepScheduler, diffusers.DDPMScheduler,
    )},
    **{("transformers", cls.__name__): cls for cls in (
        transformers.T5EncoderModel, transformers.CLIPTextModel, transformers.T5Tokenizer,
        transformers.T5TokenizerFast, transformers.CLIPTokenizer, transformers.CLIPTokenizerFast,
    )},
}


def class_in_model_index(index, folder, index_path):
    """The class that a parsed model_index.json names for a folder, mapped to this project."""
    name = tuple(index.get(folder) or ())
    if name not in KNOWN_CLASSES:
        raise WeightsError(f"{index_path} names {name or 'nothing'} for {folder!r}; expected one of "
                           f"{sorted(KNOWN_CLASSES)}")
    return KNOWN_CLASSES[name]


def component_class(weights_dir, component):
    """The class that the repo's model_index.json names for a component, mapped to this project."""
    index_path = Path(weights_dir) / component.repo / "model_index.json"
    return class_in_model_index(json.loads(index_path.read_text()), component.folder, index_path)


def load_transformers_model(cls, folder, dtype, device):
    """Loads a transformers model strictly, straight onto `device` in `dtype`: the library casts
    each tensor as it reads it and keeps the class's float32 modules (see show1.precision), so no
    `.to(dtype)` afterwards, which would undo that."""
    model, info = cls.from_pretrained(folder, dtype=dtype, device_map=str(device), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointMismatchError(f"{folder} does not match its config: {problems}")
    return model.eval()


def scheduler_from_config(cls, config):
    scheduler = cls.from_config(config)
    if "final_sigmas_type" in scheduler.config:
        # The reference's DPM-Solver ends its last step at the smallest trained noise level, not at 0.
        scheduler = cls.from_config(scheduler.config, final_sigmas_type="sigma_min")
    return scheduler


def load_scheduler(cls, folder):
    return scheduler_from_config(cls, cls.load_config(folder))


def load_component(weights_dir, component, device, dtype=None):
    """One component of a weights folder; a network straight onto `device` in `dtype`, or in its
    serving dtype (show1.components) when dtype is None."""
    folder = component_dir(weights_dir, component)
    cls = component_class(weights_dir, component)
    kind = component.kind.name
    if kind == "scheduler":
        return load_scheduler(cls, folder)
    if kind == "tokenizer":
        return cls.from_pretrained(folder)
    return load_network(cls, folder, dtype or component.serving_dtype, device)


def load_network(cls, folder, dtype, device):
    """A `cls` network (a transformers or a diffusers model) from `folder`, strictly, straight
    onto `device` in `dtype` (None: as stored)."""
    if issubclass(cls, transformers.PreTrainedModel):
        return load_transformers_model(cls, folder, dtype, device)
    return load_diffusers_model(cls, folder, dtype=dtype, device=device)
