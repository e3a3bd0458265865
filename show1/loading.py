"""Loading networks from published folders with strict checks and clear errors."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .weights import WeightsError, resolve_weight_files


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
