"""Loading published folders: every checkpoint format, strict keys, and errors that say what to do."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import REFERENCE_WEIGHTS
from show1 import Show1Pipeline
from show1.components import COMPONENTS
from show1.models import UNet3DConditionModel
from show1.weights.layout import WeightsError
from show1.weights.loading import CheckpointMismatchError, load_diffusers_model, read_state_dict, stored_float_dtype

UNET = REFERENCE_WEIGHTS / "show-1-interpolation" / "unet"


@pytest.fixture
def unet_folder(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(UNET / "config.json", folder)
    return folder


def original_state():
    return torch.load(UNET / "diffusion_pytorch_model.bin", weights_only=True)


def load(folder, dtype=None):
    return load_diffusers_model(UNet3DConditionModel, folder, dtype=dtype)


def assert_loads_original(folder, dtype=torch.float32):
    unet = load(folder, dtype)
    for key, tensor in original_state().items():
        assert torch.equal(unet.state_dict()[key], tensor.to(dtype)), key


def test_single_bin(unet_folder):
    shutil.copy(UNET / "diffusion_pytorch_model.bin", unet_folder)
    assert_loads_original(unet_folder)


def test_safetensors_and_fp16_variant(unet_folder):
    state = original_state()
    save_file({k: v.float() for k, v in state.items()}, unet_folder / "diffusion_pytorch_model.safetensors")
    save_file(state, unet_folder / "diffusion_pytorch_model.fp16.safetensors")
    # The fp16 variant is preferred; loading it gives the stored dtype unless one is asked for.
    assert load(unet_folder).dtype == torch.float16
    assert_loads_original(unet_folder)


def test_sharded_bin(unet_folder):
    state = original_state()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.bin": keys[::2], "diffusion_pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, unet_folder / name)
        weight_map.update({k: name for k in shard_keys})
    (unet_folder / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_loads_original(unet_folder)


def file_mapping(path) -> list:
    """The address ranges at which this process has `path` memory-mapped (Linux)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_float16_file_loads_into_float16_without_a_copy(unet_folder):
    path = unet_folder / "diffusion_pytorch_model.safetensors"
    save_file(original_state(), path)  # float16, as download-weights stores it
    unet = load_diffusers_model(UNet3DConditionModel, unet_folder, dtype=torch.float16)
    tensors = [*unet.parameters(), *unet.buffers()]
    assert {t.dtype for t in tensors} == {torch.float16}
    # Every parameter is the file's memory map itself: no float32 copy, no second float16 copy,
    # and each byte is read from disk once, when first used.
    mapping = file_mapping(path.resolve())
    assert mapping and all(any(start <= t.data_ptr() < end for start, end in mapping) for t in tensors)
    for key, tensor in original_state().items():
        assert torch.equal(unet.state_dict()[key], tensor), key


def test_float16_file_loads_into_float32_on_the_cpu(unet_folder):
    save_file(original_state(), unet_folder / "diffusion_pytorch_model.safetensors")
    unet = load_diffusers_model(UNet3DConditionModel, unet_folder, dtype=torch.float32)
    assert {t.dtype for t in unet.parameters()} == {torch.float32}
    assert_loads_original(unet_folder)


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_mismatched_checkpoint_names_the_key(unet_folder, change):
    state = original_state()
    key = "down_blocks.1.temp_convs.0.conv2.3.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        key = "down_blocks.1.not_a_layer.weight"
        state[key] = torch.zeros(1)
    else:
        state[key] = state[key][:, :1]
    torch.save(state, unet_folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        load(unet_folder)


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_stored_dtype_is_read_without_reading_the_tensors(unet_folder, file_format, dtype, monkeypatch):
    """dtype=None loads a checkpoint as stored; finding that dtype reads no tensor data (the
    safetensors header, the pickle's memory map), so every byte is still read once."""
    state = {"step": torch.tensor(3), **{k: v.to(dtype) for k, v in original_state().items()}}
    path = unet_folder / f"diffusion_pytorch_model.{file_format}"
    save_file(state, path) if file_format == "safetensors" else torch.save(state, path)
    monkeypatch.setattr("show1.weights.loading.read_state_dict", lambda *a, **k: pytest.fail("tensors were read"))
    assert stored_float_dtype([path]) == dtype


class NotATensor:
    pass


def test_pickles_are_read_without_arbitrary_code(unet_folder):
    torch.save({"x": NotATensor()}, unet_folder / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_state_dict([unet_folder / "diffusion_pytorch_model.bin"])


@pytest.fixture
def weights_copy(tmp_path):
    target = tmp_path / "weights"
    shutil.copytree(REFERENCE_WEIGHTS, target)
    return target


def test_missing_repo_folder_is_named_with_the_fix(weights_copy):
    shutil.rmtree(weights_copy / "IF-II-L-v1.0")
    with pytest.raises(WeightsError) as error:
        Show1Pipeline.from_pretrained(weights_copy)
    assert "IF-II-L-v1.0" in str(error.value) and "script/download-weights" in str(error.value)


def test_missing_file_is_named(weights_copy):
    (weights_copy / "show-1-sr2" / "vae" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(WeightsError, match=r"show-1-sr2/vae/diffusion_pytorch_model"):
        Show1Pipeline.from_pretrained(weights_copy)


def test_missing_weights_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        Show1Pipeline.from_pretrained(tmp_path / "nowhere")


def test_unknown_class_in_model_index_is_refused(weights_copy):
    index_path = weights_copy / "show-1-sr2" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vae"] = ["somepackage", "Autoencoder"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="somepackage"):
        Show1Pipeline.from_pretrained(weights_copy)


def test_loads_only_what_the_cascade_uses(tiny_pipeline):
    pipe = tiny_pipeline  # Show1Pipeline.from_pretrained(tiny_weights), loaded once for the session
    loaded = pipe.components.loaded
    assert list(loaded) == list(COMPONENTS)
    t5_encoders = [c for c in loaded.values() if type(c).__name__ == "T5EncoderModel"]
    assert len(t5_encoders) == 1
    assert not any(network.training for network in pipe.components.networks())
    assert not [c for c in COMPONENTS if c.folder in ("feature_extractor", "safety_checker", "watermarker")]
