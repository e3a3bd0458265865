"""script/make-tiny-weights: a complete tiny weights folder in the published layout, built from a seed."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers

from bench.random_weights import tiny_repos
from show1 import Show1Pipeline
from show1.components import COMPONENTS, DIFFUSERS_MODEL, NETWORKS, TRANSFORMERS_MODEL, component
from show1.models import UNet3DConditionModel
from show1.weights.layout import component_dir, required_files, resolve_weight_files
from show1.weights.loading import read_state_dict
from show1.weights.manifest import verify_manifest
from show1.weights.preparation.conversion import SERVING, network_dtype_rule
from show1.weights.preparation.download import download_weights
from show1.weights.preparation.sources import LocalSource

from conftest import FAST, REFERENCE_WEIGHTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "script" / "make-tiny-weights"
CONFIGS = tiny_repos()

# Three runs: seed 0 twice to check reproducibility, seed 1 in the other format.
RUNS = {
    "seed0": ("--seed", "0"),
    "seed0_again": ("--seed", "0", "--format", "bin"),
    "seed1_safetensors": ("--seed", "1", "--format", "safetensors"),
}
FORMATS = {"seed0": "bin", "seed1_safetensors": "safetensors"}

SHOW1_UNET_REPOS = ("show-1-base", "show-1-interpolation", "show-1-sr1", "show-1-sr2")
NETWORK_KEYS = [network.key for network in NETWORKS]
PROMPT = "A burning lamborghini driving on rainbow."
MAX_TOKENS = 77


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folder of each run. The runs go in parallel, from a working directory outside the
    repository to show that the script finds the engine on its own."""
    root = tmp_path_factory.mktemp("tiny-weights")
    processes = {
        name: subprocess.Popen([sys.executable, str(SCRIPT), str(root / name), *args], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in RUNS.items()
    }
    for name, process in processes.items():
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {errors}"
    return {name: root / name for name in RUNS}


def folder_of(weights_dir, key):
    return component_dir(weights_dir, component(key))


def network_state(weights_dir, key):
    """The tensors of one network as the engine resolves and reads them."""
    return read_state_dict(resolve_weight_files(folder_of(weights_dir, key), component(key).kind))


def files_by_hash(weights_dir):
    return {
        path.relative_to(weights_dir): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(weights_dir.rglob("*")) if path.is_file()
    }


def folder_config(repo, folder):
    return CONFIGS[repo]["folders"][folder]["config"]


@pytest.mark.parametrize("run, file_format", FORMATS.items())
def test_folder_holds_what_the_engine_reads_and_nothing_else(runs, run, file_format):
    weights_dir = runs[run]
    written = {path.relative_to(weights_dir) for path in weights_dir.rglob("*") if path.is_file()}
    read = {path.relative_to(weights_dir) for path in required_files(weights_dir)}
    assert read <= written
    # The engine prefers IF-II's float16 variant; the full-precision file is there as published.
    assert written - read == {Path(f"IF-II-L-v1.0/unet/diffusion_pytorch_model.{file_format}")}


def test_configs_and_tokenizer_files_equal_the_reference_fixture(runs):
    weights_dir = runs["seed0"]
    data_files = [
        path for path in weights_dir.rglob("*")
        if path.suffix in (".json", ".txt") and not path.name.endswith(".index.json")
    ]
    assert len(data_files) == 26  # 5 model_index.json, 7 scheduler and 8 network configs, 6 tokenizer files
    for path in data_files:
        assert path.read_bytes() == (REFERENCE_WEIGHTS / path.relative_to(weights_dir)).read_bytes(), path


@pytest.mark.parametrize("run", FORMATS)
@pytest.mark.parametrize("repo", SHOW1_UNET_REPOS)
def test_show1_unets_have_exactly_the_tensors_of_their_config(runs, run, repo):
    folder = runs[run] / repo / "unet"
    state = read_state_dict(resolve_weight_files(folder, DIFFUSERS_MODEL))
    config = json.loads((folder / "config.json").read_text())
    fresh = UNet3DConditionModel.from_config(config).state_dict()
    assert state.keys() == fresh.keys()
    assert {k: t.shape for k, t in state.items()} == {k: t.shape for k, t in fresh.items()}
    assert {t.dtype for t in state.values()} == {torch.float16}


def assert_loaded_strictly(info):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info["error_msgs"]


@pytest.mark.parametrize("run", FORMATS)
@pytest.mark.parametrize(
    "folder, cls, variant",
    [
        ("IF-II-L-v1.0/unet", diffusers.UNet2DConditionModel, None),
        ("IF-II-L-v1.0/unet", diffusers.UNet2DConditionModel, "fp16"),
        ("show-1-sr2/vae", diffusers.AutoencoderKL, None),
    ],
)
def test_diffusers_networks_load_strictly(runs, run, folder, cls, variant):
    _, info = cls.from_pretrained(runs[run] / folder, variant=variant, output_loading_info=True)
    assert_loaded_strictly(info)


@pytest.mark.parametrize("run", FORMATS)
@pytest.mark.parametrize(
    "folder, cls, dtype",
    [
        ("show-1-base/text_encoder", transformers.T5EncoderModel, torch.float32),
        ("show-1-sr2/text_encoder", transformers.CLIPTextModel, torch.float16),
    ],
)
def test_text_encoders_load_strictly_in_their_stored_dtype(runs, run, folder, cls, dtype):
    model, info = cls.from_pretrained(runs[run] / folder, output_loading_info=True)
    assert_loaded_strictly(info)
    assert model.dtype == dtype


def test_t5_is_sharded_in_two_files(runs):
    for run, file_format in FORMATS.items():
        files = resolve_weight_files(folder_of(runs[run], "text.t5"), TRANSFORMERS_MODEL)
        assert [path.suffix for path in files] == [".json", f".{file_format}", f".{file_format}"]


@pytest.mark.parametrize("key", NETWORK_KEYS)
def test_every_parameter_is_random_and_exact_in_float16(runs, key):
    for name, tensor in network_state(runs["seed0"], key).items():
        # No tensor left at a constant default (zero output convs, unit norms).
        assert tensor.float().std() > 0, name
        assert torch.equal(tensor.float(), tensor.half().float()), name


@pytest.mark.parametrize("key", NETWORK_KEYS)
def test_a_different_seed_gives_different_weights(runs, key):
    first, second = network_state(runs["seed0"], key), network_state(runs["seed1_safetensors"], key)
    assert first.keys() == second.keys()
    assert all(not torch.equal(first[name].float(), second[name].float()) for name in first)


def test_the_same_seed_gives_identical_files(runs):
    first, second = files_by_hash(runs["seed0"]), files_by_hash(runs["seed0_again"])
    assert first and first == second


@pytest.mark.parametrize("run", FORMATS)
def test_if2_float16_variant_equals_the_float32_file(runs, run):
    folder = folder_of(runs[run], "first_frame.unet")
    full = read_state_dict([path for path in folder.iterdir() if path.stem == "diffusion_pytorch_model"])
    half = read_state_dict([folder / "diffusion_pytorch_model.fp16.safetensors"])
    assert full.keys() == half.keys()
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert all(torch.equal(full[name], half[name].float()) for name in full)


def encode(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids


@pytest.mark.parametrize("cls", [transformers.T5Tokenizer, transformers.AutoTokenizer])
def test_t5_tokenizer_loads_and_pads_to_77(runs, cls):
    tokenizer = cls.from_pretrained(folder_of(runs["seed0"], "text.t5_tokenizer"))
    spec = CONFIGS["show-1-base"]["folders"]["tokenizer"]
    assert len(tokenizer) == spec["pieces"] + spec["tokenizer_config"]["extra_ids"]
    ids = encode(tokenizer, PROMPT.lower())
    text_length = ids.index(tokenizer.eos_token_id)
    assert len(ids) == MAX_TOKENS
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 0 < text_length and tokenizer.unk_token_id not in ids[:text_length]
    assert ids[text_length + 1:] == [tokenizer.pad_token_id] * (MAX_TOKENS - text_length - 1)
    assert max(ids) < folder_config("show-1-base", "text_encoder")["vocab_size"]


@pytest.mark.parametrize("cls", [transformers.CLIPTokenizer, transformers.AutoTokenizer])
def test_clip_tokenizer_loads_and_pads_to_77(runs, cls):
    tokenizer = cls.from_pretrained(folder_of(runs["seed0"], "text.clip_tokenizer"))
    vocab_size = folder_config("show-1-sr2", "text_encoder")["vocab_size"]
    assert len(tokenizer) == vocab_size
    ids = encode(tokenizer, PROMPT)
    end = ids.index(tokenizer.eos_token_id)
    assert len(ids) == MAX_TOKENS and ids[0] == tokenizer.bos_token_id
    assert ids[end + 1:] == [tokenizer.convert_tokens_to_ids("!")] * (MAX_TOKENS - end - 1)
    # CLIP pools the hidden state at the highest id, which must be the end-of-text token.
    assert tokenizer.eos_token_id == max(ids) == vocab_size - 1
    # The merges join letters: every multi-letter merge word becomes fewer tokens than letters
    # (not always one: an earlier word's merges can claim its first letters).
    for word in CONFIGS["show-1-sr2"]["folders"]["tokenizer"]["merge_words"]:
        tokens = tokenizer.tokenize(word)
        assert "".join(tokens) == word + "</w>"
        assert len(tokens) < len(word) or len(word) == 1, tokens
    assert tokenizer.tokenize("driving") == ["driving</w>"]


def test_download_weights_stores_generated_weights_in_their_serving_dtypes(runs, tmp_path):
    """The generated folder as a mirror: float32 T5 shards in safetensors are converted in place."""
    mirror, weights_dir = runs["seed1_safetensors"], tmp_path / "weights"
    download_weights(weights_dir, LocalSource(mirror), out=lambda line: None)
    verify_manifest(weights_dir)
    for key in NETWORK_KEYS:
        published, stored = network_state(mirror, key), network_state(weights_dir, key)
        dtype_of = network_dtype_rule(weights_dir, component(key), SERVING)
        assert published.keys() == stored.keys(), key
        for name, tensor in published.items():
            assert stored[name].dtype == dtype_of(name, tensor.dtype), name
            assert torch.equal(stored[name], tensor.to(stored[name].dtype)), name
    t5 = network_state(weights_dir, "text.t5")
    assert {n for n, t in t5.items() if t.dtype == torch.float32} == {n for n in t5 if ".wo." in n} != set()
    pipe = Show1Pipeline.from_pretrained(weights_dir, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(PROMPT, seed=0, keyframe_steps=2, output_stage="keyframes")
    assert result.frames.shape == (8, 40, 64, 3) and result.frames.std() > 0


def test_the_pipeline_loads_the_other_format(runs):
    pipe = Show1Pipeline.from_pretrained(runs["seed1_safetensors"], device="cpu", dtype=torch.float32)
    assert list(pipe.components.loaded) == list(COMPONENTS)


def test_the_pipeline_runs_on_generated_weights(runs, small_keyframes):
    # Small keyframes (conftest.SMALL_KEYFRAMES): that the generated weights load and compute a
    # video does not depend on its size.
    pipe = Show1Pipeline.from_pretrained(runs["seed0"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(PROMPT, seed=0, output_stage="interpolated", **FAST)
    assert result.frames.shape == (29, *small_keyframes, 3)
    assert result.frames.dtype == np.uint8
    assert result.frames.std() > 0
