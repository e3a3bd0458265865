"""Checkpoints stored as safetensors in the dtypes the networks run in, checked tensor by tensor,
and the size each file will have once converted, known before anything large is fetched."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...components import NETWORKS
from ...files import written_atomically
from ...precision import tensor_dtype_rule
from ..layout import is_checkpoint, is_pickle_index, safetensors_name
from ..loading import build_network, class_in_model_index, component_class
from ..manifest import dtype_names
from .sources import DownloadError, read_source_json


class ConversionError(DownloadError):
    """A pickle could not be converted to safetensors exactly."""


# What the folder stores: every network in its serving dtype (show1.components.Component.serving_dtype,
# with the float32 modules of its class), or every tensor in the dtype it is published in.
SERVING, PUBLISHED = "serving", "published"

# Written into each converted file, so that a re-run knows which fetched file it came from.
CONVERTED_FROM, CONVERTED_FROM_SIZE, PRECISION = "show1.converted_from", "show1.converted_from_size", "show1.precision"

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
    """rule(name, stored_dtype) of the dtypes a network's checkpoint is stored in: its serving
    dtype (show1.precision.tensor_dtype_rule), or as published."""
    if precision != SERVING:
        return keep_dtype
    return tensor_dtype_rule(component_class(weights_dir, component), component.serving_dtype)


def current_file(path) -> Path:
    """A fetched file, or what it was converted to."""
    return path if path.is_file() else path.with_name(safetensors_name(path.name))


def convert_networks(weights_dir, plan, precision, out=print):
    """Stores every network's checkpoints as safetensors in the dtypes of `precision`, then
    rewrites the pickle indexes for their converted shards."""
    for component in NETWORKS:
        prefix = component.folder + "/"
        paths = [f.destination(weights_dir) for f in plan if f.repo == component.repo and f.path.startswith(prefix)]
        dtype_of = network_dtype_rule(weights_dir, component, precision)
        for path in [p for p in paths if is_checkpoint(p.name)]:
            convert_checkpoint(current_file(path), dtype_of, out)
        for path in [p for p in paths if is_pickle_index(p.name) and p.is_file()]:
            convert_index(path)


# Sizes after conversion, known before fetching


def network_tensors(cls, config) -> dict:
    """{name: tensor} of a `cls` network built from its config on the meta device (shapes and
    dtypes, no data)."""
    with torch.device("meta"):
        return build_network(cls, config).state_dict()


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
    for component in [c for c in NETWORKS if c.repo == repo]:
        prefix = component.folder + "/"
        cls = class_in_model_index(model_index, component.folder, f"{repo}/model_index.json")
        tensors = network_tensors(cls, read_source_json(source, repo, prefix + "config.json"))
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

