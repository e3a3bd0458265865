"""script/download-weights: which files it takes, the --from copy, conversion to safetensors in the
serving dtypes (or, with --keep-dtypes, the published ones), resuming, the manifest it writes, the
Hub path (with the Hub calls replaced) and its error messages."""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
import transformers
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import show1.weights.preparation.conversion as conversion
import show1.weights.preparation.download as download
import show1.weights.preparation.sources as sources
from show1.components import NETWORKS, component
from show1.precision import tensor_dtype_rule
from show1.weights.layout import required_files, safetensors_name
from show1.weights.manifest import manifest_precision, read_manifest, verify_manifest
from show1.weights.preparation import verify
from show1.weights.preparation.conversion import (
    PUBLISHED,
    SERVING,
    ConversionError,
    convert_checkpoint,
    convert_index,
    network_dtype_rule,
)
from show1.weights.preparation.download import download_weights, select_repo_files
from show1.weights.preparation.sources import DownloadError, HubSource, LocalSource, SourceFile

from conftest import REFERENCE_WEIGHTS

ROOT = Path(__file__).resolve().parent.parent
DOWNLOAD_SCRIPT = ROOT / "script" / "download-weights"

# What a complete download of the five repos holds: no T5 copies from interpolation/sr1, no
# feature extractor, only the fp16 IF-II UNet, and safetensors wherever the repos have pickles.
EXPECTED_FILES = {
    "manifest.json",
    "show-1-base/model_index.json",
    "show-1-base/scheduler/scheduler_config.json",
    "show-1-base/text_encoder/config.json",
    "show-1-base/text_encoder/model.safetensors.index.json",
    "show-1-base/text_encoder/model-00001-of-00002.safetensors",
    "show-1-base/text_encoder/model-00002-of-00002.safetensors",
    "show-1-base/tokenizer/spiece.model",
    "show-1-base/tokenizer/special_tokens_map.json",
    "show-1-base/tokenizer/tokenizer_config.json",
    "show-1-base/unet/config.json",
    "show-1-base/unet/diffusion_pytorch_model.safetensors",
    "show-1-interpolation/model_index.json",
    "show-1-interpolation/scheduler/scheduler_config.json",
    "show-1-interpolation/unet/config.json",
    "show-1-interpolation/unet/diffusion_pytorch_model.safetensors",
    "IF-II-L-v1.0/model_index.json",
    "IF-II-L-v1.0/scheduler/scheduler_config.json",
    "IF-II-L-v1.0/image_noising_scheduler/scheduler_config.json",
    "IF-II-L-v1.0/unet/config.json",
    "IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors",
    "show-1-sr1/model_index.json",
    "show-1-sr1/scheduler/scheduler_config.json",
    "show-1-sr1/image_noising_scheduler/scheduler_config.json",
    "show-1-sr1/unet/config.json",
    "show-1-sr1/unet/diffusion_pytorch_model.safetensors",
    "show-1-sr2/model_index.json",
    "show-1-sr2/scheduler/scheduler_config.json",
    "show-1-sr2/text_encoder/config.json",
    "show-1-sr2/text_encoder/model.safetensors",
    "show-1-sr2/tokenizer/merges.txt",
    "show-1-sr2/tokenizer/special_tokens_map.json",
    "show-1-sr2/tokenizer/tokenizer_config.json",
    "show-1-sr2/tokenizer/vocab.json",
    "show-1-sr2/unet/config.json",
    "show-1-sr2/unet/diffusion_pytorch_model.safetensors",
    "show-1-sr2/vae/config.json",
    "show-1-sr2/vae/diffusion_pytorch_model.safetensors",
}

# Every single-file pickle of the fixture repos that the cascade reads, and its converted name.
CONVERTED_PICKLES = {
    "show-1-base/unet/diffusion_pytorch_model.bin": "show-1-base/unet/diffusion_pytorch_model.safetensors",
    "show-1-interpolation/unet/diffusion_pytorch_model.bin": "show-1-interpolation/unet/diffusion_pytorch_model.safetensors",
    "show-1-sr1/unet/diffusion_pytorch_model.bin": "show-1-sr1/unet/diffusion_pytorch_model.safetensors",
    "show-1-sr2/unet/diffusion_pytorch_model.bin": "show-1-sr2/unet/diffusion_pytorch_model.safetensors",
    "show-1-sr2/vae/diffusion_pytorch_model.bin": "show-1-sr2/vae/diffusion_pytorch_model.safetensors",
    "show-1-sr2/text_encoder/pytorch_model.bin": "show-1-sr2/text_encoder/model.safetensors",
    "show-1-base/text_encoder/pytorch_model-00001-of-00002.bin": "show-1-base/text_encoder/model-00001-of-00002.safetensors",
    "show-1-base/text_encoder/pytorch_model-00002-of-00002.bin": "show-1-base/text_encoder/model-00002-of-00002.safetensors",
}


# The network each converted file belongs to, for its serving dtypes.
NETWORK_OF = {
    converted: next(c.key for c in NETWORKS if converted.startswith(f"{c.repo}/{c.folder}/"))
    for converted in CONVERTED_PICKLES.values()
}
T5_SHARDS = [p for p in CONVERTED_PICKLES.values() if p.startswith("show-1-base/text_encoder/")]


def relative_files(folder) -> set:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


def file_contents(path):
    """What a file holds: for safetensors, its metadata and each tensor's dtype, shape and bytes
    (safetensors writes its metadata in no fixed order, so equal files may differ in bytes)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = {name: (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())) for name, t in load_file(path).items()}
    return metadata, tensors


def modification_times(folder) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def assert_bit_identical(original: dict, converted: dict):
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        copy = converted[name]
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape, name
        assert torch.equal(copy.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)), name


def load_pickle(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def serving_dtype_of(converted_name):
    """The per-tensor serving dtype rule of the network a converted file belongs to."""
    return network_dtype_rule(REFERENCE_WEIGHTS, component(NETWORK_OF[converted_name]), SERVING)


def cast_by(state_dict, dtype_of) -> dict:
    return {name: tensor.to(dtype_of(name, tensor.dtype)) for name, tensor in state_dict.items()}


def published_tensors(converted_name) -> dict:
    """The tensors of the fixture pickle that a converted file was made from."""
    pickle_name = next(p for p, c in CONVERTED_PICKLES.items() if c == converted_name)
    return load_pickle(REFERENCE_WEIGHTS / pickle_name)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """A local copy of the five repos, standing in for the Hub."""
    path = tmp_path_factory.mktemp("mirror") / "repos"
    shutil.copytree(REFERENCE_WEIGHTS, path)
    return path


@pytest.fixture(scope="module")
def downloaded(mirror, tmp_path_factory):
    """The real command, run from another directory: `script/download-weights --from MIRROR DIR`."""
    weights_dir = tmp_path_factory.mktemp("downloaded") / "weights"
    result = subprocess.run(
        [sys.executable, DOWNLOAD_SCRIPT, "--from", mirror, weights_dir],
        capture_output=True, text=True, cwd=tmp_path_factory.getbasetemp(),
    )
    assert result.returncode == 0, result.stderr
    return weights_dir, result.stdout


@pytest.fixture(scope="module")
def downloaded_published(mirror, tmp_path_factory) -> Path:
    """`script/download-weights --keep-dtypes --from MIRROR DIR`, in this process."""
    weights_dir = tmp_path_factory.mktemp("published") / "weights"
    assert download.main(["--keep-dtypes", "--from", str(mirror), str(weights_dir)]) == 0
    return weights_dir


@pytest.fixture
def weights_copy(downloaded, tmp_path) -> Path:
    """A downloaded folder a test may damage."""
    path = tmp_path / "weights"
    shutil.copytree(downloaded[0], path)
    return path


# ---------------------------------------------------------------------------------------------
# The command on a local mirror


def test_download_takes_only_the_files_the_cascade_reads(downloaded):
    weights_dir, stdout = downloaded
    assert relative_files(weights_dir) == EXPECTED_FILES
    # Before fetching, the plan gives the size to fetch and the size on disk once converted.
    assert re.search(r"total +37 files +25.65 MB -> +24.79 MB on disk", stdout)
    assert "text_encoder/pytorch_model-00002-of-00002.bin (220.00 kB -> 133.28 kB)" in stdout
    on_disk = sum(path.stat().st_size for path in required_files(weights_dir))
    assert format(on_disk / 1e6, ".2f") == "24.79"


def test_download_leaves_no_pickles_and_no_partial_files(downloaded):
    names = relative_files(downloaded[0])
    assert not [n for n in names if n.endswith(".bin") or ".bin." in n or ".partial" in n]


def test_download_leaves_the_mirror_untouched(mirror):
    assert relative_files(mirror) == relative_files(REFERENCE_WEIGHTS)
    for name in CONVERTED_PICKLES:
        assert (mirror / name).read_bytes() == (REFERENCE_WEIGHTS / name).read_bytes()


def test_every_network_is_stored_in_its_serving_dtypes(downloaded):
    weights_dir = downloaded[0]
    for converted_name in CONVERTED_PICKLES.values():
        # Each tensor is the published one cast to its serving dtype (float16, bit for bit).
        expected = cast_by(published_tensors(converted_name), serving_dtype_of(converted_name))
        assert_bit_identical(expected, load_file(weights_dir / converted_name))
    t5 = {}
    for shard in T5_SHARDS:
        t5.update(load_file(weights_dir / shard))
    # T5's float32 modules (its class's _keep_in_fp32_modules: the feed-forward output "wo") stay
    # float32, as transformers runs them; every other tensor is float16.
    assert {n for n, t in t5.items() if t.dtype == torch.float32} == {n for n in t5 if ".wo." in n}
    assert {t.dtype for n, t in t5.items() if ".wo." not in n} == {torch.float16}
    assert len([n for n in t5 if ".wo." in n]) == 2
    # Integer buffers keep their dtype.
    clip = load_file(weights_dir / "show-1-sr2/text_encoder/model.safetensors")
    assert clip["text_model.embeddings.position_ids"].dtype == torch.int64
    for converted_name in CONVERTED_PICKLES.values():
        if "text_encoder" not in converted_name:
            assert {t.dtype for t in load_file(weights_dir / converted_name).values()} == {torch.float16}, converted_name
    # IF-II's fp16 variant is already in its serving dtype: stored exactly as published.
    if2 = "IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors"
    assert (weights_dir / if2).read_bytes() == (REFERENCE_WEIGHTS / if2).read_bytes()


def test_t5_in_its_file_dtypes_is_what_transformers_loads_in_float16(downloaded):
    """The stored dtypes and the library's keep-in-float32 rule agree, tensor by tensor."""
    folder = downloaded[0] / "show-1-base/text_encoder"
    t5 = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.float16)
    stored = {}
    for shard in T5_SHARDS:
        stored.update(load_file(downloaded[0] / shard))
    assert {name: t.dtype for name, t in t5.state_dict().items()} == {name: stored[name].dtype for name in t5.state_dict()}


def test_keep_dtypes_converts_pickles_bit_identically(downloaded_published):
    assert relative_files(downloaded_published) == EXPECTED_FILES
    for pickle_name, converted_name in CONVERTED_PICKLES.items():
        assert_bit_identical(load_pickle(REFERENCE_WEIGHTS / pickle_name), load_file(downloaded_published / converted_name))
    t5 = load_file(downloaded_published / T5_SHARDS[0])
    assert {t.dtype for t in t5.values()} == {torch.float32}
    assert manifest_precision(downloaded_published) == PUBLISHED
    verify_manifest(downloaded_published)


def test_converted_files_carry_the_metadata_transformers_requires_and_their_source(downloaded):
    for pickle_name, converted_name in CONVERTED_PICKLES.items():
        with safe_open(downloaded[0] / converted_name, framework="pt") as f:
            assert f.metadata() == {
                "format": "pt",
                "show1.converted_from": Path(pickle_name).name,
                "show1.converted_from_size": str((REFERENCE_WEIGHTS / pickle_name).stat().st_size),
                # Whether the dtypes were changed (only T5's) or are as published.
                "show1.precision": SERVING if converted_name in T5_SHARDS else PUBLISHED,
            }


def test_sharded_index_is_rewritten_for_the_converted_shards(downloaded):
    original = json.loads((REFERENCE_WEIGHTS / "show-1-base/text_encoder/pytorch_model.bin.index.json").read_text())
    converted = json.loads((downloaded[0] / "show-1-base/text_encoder/model.safetensors.index.json").read_text())
    assert converted["metadata"] == original["metadata"]
    assert converted["weight_map"] == {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                       for k, v in original["weight_map"].items()}
    # T5 ties shared.weight and encoder.embed_tokens.weight: both keys survive the conversion.
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= converted["weight_map"].keys()


def test_manifest_lists_every_file_the_cascade_reads(downloaded):
    weights_dir = downloaded[0]
    entries = {e.path: e for e in read_manifest(weights_dir)}
    assert set(entries) == {p.relative_to(weights_dir).as_posix() for p in required_files(weights_dir)}
    assert set(entries) == EXPECTED_FILES - {"manifest.json"}
    for path, entry in entries.items():
        data = (weights_dir / path).read_bytes()
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest(), path


def test_manifest_records_each_checkpoints_dtypes_and_the_precision(downloaded):
    weights_dir = downloaded[0]
    dtypes = {e.path: e.dtypes for e in read_manifest(weights_dir) if e.dtypes}
    assert dtypes == {
        **{path: ("float16",) for path in CONVERTED_PICKLES.values() if "text_encoder" not in path},
        "IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors": ("float16",),
        "show-1-base/text_encoder/model-00001-of-00002.safetensors": ("float16",),
        "show-1-base/text_encoder/model-00002-of-00002.safetensors": ("float16", "float32"),
        "show-1-sr2/text_encoder/model.safetensors": ("float16", "int64"),
    }
    assert manifest_precision(weights_dir) == SERVING


def test_verify_weights_passes_on_the_downloaded_folder(downloaded, capsys):
    assert verify.main([str(downloaded[0])]) == 0
    assert f"OK: {len(EXPECTED_FILES) - 1} files" in capsys.readouterr().out


def test_rerun_on_a_complete_folder_changes_nothing(mirror, weights_copy, capsys):
    before = modification_times(weights_copy)
    assert download.main(["--from", str(mirror), str(weights_copy)]) == 0
    assert "match manifest.json: nothing to do" in capsys.readouterr().out
    assert modification_times(weights_copy) == before


def test_rerun_after_an_interruption_fetches_only_what_is_missing(mirror, weights_copy, capsys):
    # What an interrupted run leaves: some files not fetched yet, no manifest.
    (weights_copy / "manifest.json").unlink()
    (weights_copy / "show-1-sr2/vae/diffusion_pytorch_model.safetensors").unlink()
    (weights_copy / "show-1-sr1/scheduler/scheduler_config.json").unlink()
    before = modification_times(weights_copy)

    assert download.main(["--from", str(mirror), str(weights_copy)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] show-1-sr1/scheduler/scheduler_config.json" in out
    assert "[2/2] show-1-sr2/vae/diffusion_pytorch_model.bin" in out
    assert {p: t for p, t in modification_times(weights_copy).items() if p in before} == before
    assert relative_files(weights_copy) == EXPECTED_FILES
    verify_manifest(weights_copy)


def test_rerun_repairs_files_that_no_longer_match_the_manifest(mirror, weights_copy, capsys):
    shard = weights_copy / "show-1-base/text_encoder/model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    config = weights_copy / "show-1-sr2/unet/config.json"
    config.write_text(config.read_text().replace("4", "5", 1))

    assert download.main(["--from", str(mirror), str(weights_copy)]) == 0
    out = capsys.readouterr().out
    assert "model-00002-of-00002.safetensors: truncated (1000 of" in out
    assert "show-1-sr2/unet/config.json: altered" in out
    assert "[1/2] show-1-base/text_encoder/pytorch_model-00002-of-00002.bin" in out
    verify_manifest(weights_copy)
    assert config.read_bytes() == (REFERENCE_WEIGHTS / "show-1-sr2/unet/config.json").read_bytes()


def test_keep_dtypes_on_a_serving_folder_fetches_the_float32_t5_again(mirror, weights_copy, capsys):
    assert download.main(["--keep-dtypes", "--from", str(mirror), str(weights_copy)]) == 0
    out = capsys.readouterr().out
    assert "holds the serving dtypes; storing the published dtypes instead" in out
    # Only T5 changes: float16 cannot give its float32 values back, so its shards are fetched again.
    assert re.findall(r"\[\d+/\d+\] (\S+)", out) == [
        "show-1-base/text_encoder/pytorch_model-00001-of-00002.bin",
        "show-1-base/text_encoder/pytorch_model-00002-of-00002.bin",
    ]
    assert_bit_identical(load_pickle(REFERENCE_WEIGHTS / "show-1-base/text_encoder/pytorch_model-00001-of-00002.bin"),
                         load_file(weights_copy / T5_SHARDS[0]))
    assert manifest_precision(weights_copy) == PUBLISHED
    verify_manifest(weights_copy)


def test_serving_dtypes_on_a_published_folder_convert_without_fetching(mirror, downloaded, downloaded_published, tmp_path, capsys):
    weights_dir = tmp_path / "weights"
    shutil.copytree(downloaded_published, weights_dir)
    assert download.main(["--from", str(mirror), str(weights_dir)]) == 0
    out = capsys.readouterr().out
    assert not re.findall(r"\[\d+/\d+\]", out)
    assert "converting" in out and T5_SHARDS[0].split("/")[-1] in out
    assert relative_files(weights_dir) == relative_files(downloaded[0])
    for path in relative_files(weights_dir) - {"manifest.json"}:
        assert file_contents(weights_dir / path) == file_contents(downloaded[0] / path), path


def test_from_a_folder_without_the_repos_says_what_it_expects(tmp_path, capsys):
    assert download.main(["--from", str(tmp_path), str(tmp_path / "weights")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'show-1-base'} does not exist" in err and "one sub-folder per repo" in err


def test_download_refuses_to_start_without_enough_disk_space(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError, match="has 1.00 kB free; fetching and converting needs"):
        download_weights(tmp_path / "weights", LocalSource(mirror), out=lambda line: None)
    assert not (tmp_path / "weights" / "show-1-base").exists()


# ---------------------------------------------------------------------------------------------
# The converted folder loads with the libraries the engine uses


def test_transformers_load_the_converted_text_encoders(downloaded, downloaded_published):
    from transformers import CLIPTextModel, T5EncoderModel

    # On the CPU the pipeline upcasts to float32: the values are the serving ones.
    for weights_dir in (downloaded[0], downloaded_published):
        t5 = T5EncoderModel.from_pretrained(weights_dir / "show-1-base/text_encoder", dtype=torch.float32)
        t5_stored = {}
        for shard in T5_SHARDS:
            t5_stored.update(load_file(weights_dir / shard))
        t5_state = t5.state_dict()
        assert all(torch.equal(t5_state[name], tensor.float()) for name, tensor in t5_stored.items())

    clip = CLIPTextModel.from_pretrained(downloaded[0] / "show-1-sr2/text_encoder")
    clip_pickle = load_pickle(REFERENCE_WEIGHTS / "show-1-sr2/text_encoder/pytorch_model.bin")
    clip_state = clip.state_dict()
    assert all(torch.equal(clip_state[name], tensor) for name, tensor in clip_pickle.items() if name in clip_state)
    assert clip.dtype == torch.float16


def test_pipeline_loads_the_converted_folder_and_runs(downloaded, tiny_pipeline):
    from show1 import Show1Pipeline

    converted = Show1Pipeline.from_pretrained(downloaded[0], device="cpu", dtype=torch.float32)
    # The fixture's folder as loaded once for the session: from_pretrained(REFERENCE_WEIGHTS, "cpu", float32).
    original = tiny_pipeline
    networks = [network.key for network in NETWORKS]
    assert len(converted.components.networks()) == len(networks) == 8
    for key in networks:
        ours, theirs = converted.components[key].state_dict(), original.components[key].state_dict()
        assert ours.keys() == theirs.keys(), key
        assert {t.dtype for t in ours.values() if t.is_floating_point()} == {torch.float32}, key
        # The published weights, rounded to their serving dtypes (a no-op for every network
        # published in float16, which is all of them but T5).
        dtype_of = network_dtype_rule(REFERENCE_WEIGHTS, component(key), SERVING)
        assert all(torch.equal(ours[name], theirs[name].to(dtype_of(name, theirs[name].dtype)).to(ours[name].dtype))
                   for name in ours), key
    converted.set_progress_bar_config(disable=True)
    result = converted("A burning lamborghini driving on rainbow.", seed=0, keyframe_steps=1, output_stage="keyframes")
    assert result.frames.shape == (8, 40, 64, 3) and result.frames.std() > 0


def test_pipeline_loads_the_serving_dtypes_as_stored_without_warnings(downloaded, capfd, recwarn):
    from show1 import Show1Pipeline

    pipe = Show1Pipeline.from_pretrained(downloaded[0], device="cpu", dtype=torch.float16)
    t5 = pipe.components.text.t5
    assert {n for n, p in t5.named_parameters() if p.dtype == torch.float32} == {n for n, _ in t5.named_parameters() if ".wo." in n}
    for network in NETWORKS:
        if network.key != "text.t5":
            assert {p.dtype for p in pipe.components[network.key].parameters()} == {torch.float16}, network.key
    # Nothing is cast after loading, so the libraries have nothing to warn about: the only output
    # is transformers' progress bar.
    assert [str(w.message) for w in recwarn] == []
    printed = capfd.readouterr()
    lines = re.split(r"[\r\n]+", printed.out + printed.err)
    assert [line for line in lines if line.strip() and not line.startswith("Loading weights")] == []


# ---------------------------------------------------------------------------------------------
# Choosing files from a listing (the same function for the Hub and a local folder)


def no_index(path):
    raise AssertionError(f"no index should be read, asked for {path}")


def listing(*paths) -> dict:
    return {path: SourceFile(1) for path in paths}


def test_selection_takes_the_fp16_safetensors_only():
    files = listing(
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "scheduler/scheduler_config.json", "image_noising_scheduler/scheduler_config.json",
        "safety_checker/model.safetensors", "text_encoder/model.fp16-00001-of-00002.safetensors",
        "feature_extractor/preprocessor_config.json", "watermarker/diffusion_pytorch_model.safetensors",
    )
    assert select_repo_files("IF-II-L-v1.0", files, no_index) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "scheduler/scheduler_config.json", "image_noising_scheduler/scheduler_config.json",
    ]


def test_selection_takes_an_index_and_exactly_its_shards():
    files = listing(
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json",
        "tokenizer/spiece.model", "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model-00001-of-00003.safetensors", "text_encoder/pytorch_model.bin.index.json",
    )
    asked = []

    def read_index(path):
        asked.append(path)
        return {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}

    selected = select_repo_files("show-1-base", files, read_index)
    assert asked == ["text_encoder/model.safetensors.index.json"]
    assert [p for p in selected if p.startswith("text_encoder/")] == [
        "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    ]


def test_selection_names_every_file_the_repo_lacks():
    files = listing("unet/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json")
    with pytest.raises(DownloadError) as error:
        select_repo_files("show-1-interpolation", files, no_index)
    assert "show-1-interpolation lacks files the cascade reads: model_index.json, unet/config.json" in str(error.value)


# ---------------------------------------------------------------------------------------------
# The Hub path, with the two functions that call the Hub replaced by the fixture repos


class FakeHub:
    """hub_list_files / hub_download_file answered from the fixture repos."""

    def __init__(self, sha256_of=None):
        self.downloads = []
        self.sha256_of = sha256_of or {}

    def list_files(self, repo_id, token):
        folder = REFERENCE_WEIGHTS / repo_id.split("/")[1]
        return {
            p.relative_to(folder).as_posix(): SourceFile(p.stat().st_size, self.sha256_of.get(p.relative_to(folder).as_posix()))
            for p in folder.rglob("*") if p.is_file()
        }

    def download_file(self, repo_id, path, repo_dir, token):
        self.downloads.append(f"{repo_id}/{path}")
        target = Path(repo_dir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REFERENCE_WEIGHTS / repo_id.split("/")[1] / path, target)
        return target


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(sources, "hub_list_files", hub.list_files)
    monkeypatch.setattr(sources, "hub_download_file", hub.download_file)
    return hub


def test_hub_download_fetches_only_the_selected_files(fake_hub, tmp_path):
    if2_unet = REFERENCE_WEIGHTS / "IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors"
    fake_hub.sha256_of = {"unet/diffusion_pytorch_model.fp16.safetensors": hashlib.sha256(if2_unet.read_bytes()).hexdigest()}
    download_weights(tmp_path, HubSource(token="hf_test"), out=lambda line: None)
    assert relative_files(tmp_path) == EXPECTED_FILES
    fetched = set(fake_hub.downloads)
    assert not [p for p in fetched if "feature_extractor" in p]
    assert not [p for p in fetched if p.startswith(("showlab/show-1-interpolation/text_encoder", "showlab/show-1-sr1/text_encoder"))]
    assert "DeepFloyd/IF-II-L-v1.0/unet/diffusion_pytorch_model.safetensors" not in fetched
    assert "DeepFloyd/IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors" in fetched
    verify_manifest(tmp_path)


def test_hub_download_with_another_sha256_than_published_fails_and_deletes_the_file(fake_hub, tmp_path):
    fake_hub.sha256_of = {"unet/diffusion_pytorch_model.fp16.safetensors": "0" * 64}
    with pytest.raises(DownloadError, match="IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors does not have the sha256"):
        download_weights(tmp_path, HubSource(token="hf_test"), out=lambda line: None)
    assert not (tmp_path / "IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors").exists()


def refused(error_class, status):
    url = "https://huggingface.co/api/models/DeepFloyd/IF-II-L-v1.0/auth-check"
    response = httpx2.Response(status, request=httpx2.Request("GET", url))
    return error_class(f"{status} Client Error: access to DeepFloyd/IF-II-L-v1.0 is restricted", response=response)


@pytest.fixture
def gated_hub(fake_hub, monkeypatch):
    """The fake Hub, refusing the DeepFloyd repo as the real one does for an account without access."""
    def list_files(repo_id, token):
        if repo_id == "DeepFloyd/IF-II-L-v1.0":
            raise refused(GatedRepoError, 403) if token else refused(RepositoryNotFoundError, 401)
        return FakeHub.list_files(fake_hub, repo_id, token)

    monkeypatch.setattr(sources, "hub_list_files", list_files)
    return fake_hub


def test_gated_repo_without_a_token_says_to_set_hf_token(gated_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "get_token", lambda: None)
    assert download.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "DeepFloyd/IF-II-L-v1.0 is a gated repo and no Hugging Face token is set" in err
    assert "accept the licence at https://huggingface.co/DeepFloyd/IF-II-L-v1.0" in err
    assert "HF_TOKEN=<that token>" in err
    # Every repo is listed before anything is fetched, so the refusal comes before any download
    # (only small JSON files are read while planning: indexes, model_index.json, network configs).
    assert relative_files(tmp_path) == set()
    assert all(path.endswith(".json") for path in gated_hub.downloads)


def test_gated_repo_with_a_token_that_has_no_access_says_to_accept_the_licence(gated_hub, tmp_path):
    with pytest.raises(DownloadError) as error:
        download_weights(tmp_path, HubSource(token="hf_no_access"), out=lambda line: None)
    message = str(error.value)
    assert "The account of the token in HF_TOKEN has not accepted the licence of the gated repo DeepFloyd/IF-II-L-v1.0" in message
    assert "accept the licence at https://huggingface.co/DeepFloyd/IF-II-L-v1.0" in message
    assert "HF_TOKEN must be a token of an account that accepted the licence" in message
    assert isinstance(error.value.__cause__, GatedRepoError)


def test_a_rejected_token_is_reported_as_such(fake_hub, tmp_path, monkeypatch):
    def list_files(repo_id, token):
        raise refused(RepositoryNotFoundError, 401)

    monkeypatch.setattr(sources, "hub_list_files", list_files)
    with pytest.raises(DownloadError, match="The Hub refused the token in HF_TOKEN for showlab/show-1-base: it is invalid"):
        download_weights(tmp_path, HubSource(token="hf_expired"), out=lambda line: None)


# ---------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("name, converted", [
    ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
    ("diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.safetensors"),
    ("diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.safetensors.index.json"),
    ("pytorch_model.bin", "model.safetensors"),
    ("pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors"),
    ("pytorch_model.bin.index.json", "model.safetensors.index.json"),
    ("pytorch_model.bin.index.fp16.json", "model.safetensors.index.fp16.json"),
])
def test_converted_names_are_those_the_loaders_look_for(name, converted):
    assert safetensors_name(name) == converted


def test_conversion_keeps_tied_strided_and_special_tensors_exactly(tmp_path):
    base = torch.randn(4, 6)
    whole = torch.arange(12, dtype=torch.float32)
    state_dict = {
        "shared.weight": base,
        "encoder.embed_tokens.weight": base,  # tied: the same storage twice
        "transposed": torch.randn(6, 4).t(),  # not contiguous
        "whole": whole,
        "part": whole[2:5],  # a view into another tensor's storage
        "half": torch.randn(3, dtype=torch.float16),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "position_ids": torch.arange(7).unsqueeze(0),  # int64 buffer
        "flags": torch.tensor([True, False]),
        "specials": torch.tensor([float("nan"), -0.0, float("inf")]),
    }
    pickle = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, pickle)

    converted = convert_checkpoint(pickle)

    assert converted == tmp_path / "model.safetensors"
    assert not pickle.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_bit_identical(state_dict, load_file(converted))


class KeepsGateInFloat32(torch.nn.Module):
    _keep_in_fp32_modules = ["gate"]


def test_serving_dtypes_follow_the_float32_modules_the_class_declares():
    rule = tensor_dtype_rule(KeepsGateInFloat32, torch.float16)
    assert rule("block.0.gate.weight", torch.float32) == torch.float32
    assert rule("block.0.gate_proj.weight", torch.float32) == torch.float16  # whole module names only
    assert rule("block.0.wo.weight", torch.float32) == torch.float16
    assert rule("position_ids", torch.int64) == torch.int64
    # transformers keeps those modules in float32 only when float16 is asked for.
    assert tensor_dtype_rule(KeepsGateInFloat32, torch.float32)("block.0.gate.weight", torch.float16) == torch.float32
    assert tensor_dtype_rule(KeepsGateInFloat32, torch.bfloat16)("block.0.gate.weight", torch.float32) == torch.bfloat16
    assert tensor_dtype_rule(transformers.T5EncoderModel, torch.float16)("encoder.block.3.layer.1.DenseReluDense.wo.weight", torch.float32) == torch.float32


def test_conversion_casts_each_tensor_to_its_serving_dtype_exactly(tmp_path):
    base = torch.randn(4, 6)
    state_dict = {
        "shared.weight": base,
        "encoder.embed_tokens.weight": base,  # tied
        "block.0.gate.weight": torch.randn(3, 3),
        "block.0.up.weight": torch.randn(6, 4).t(),
        "position_ids": torch.arange(7).unsqueeze(0),
        "specials": torch.tensor([float("nan"), -0.0, float("inf"), 1e6]),  # 1e6 overflows float16
    }
    pickle = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, pickle)
    dtype_of = tensor_dtype_rule(KeepsGateInFloat32, torch.float16)

    converted = convert_checkpoint(pickle, dtype_of)

    assert not pickle.exists()
    stored = load_file(converted)
    assert {name: t.dtype for name, t in stored.items()} == {
        "shared.weight": torch.float16, "encoder.embed_tokens.weight": torch.float16, "block.0.gate.weight": torch.float32,
        "block.0.up.weight": torch.float16, "position_ids": torch.int64, "specials": torch.float16,
    }
    assert_bit_identical(cast_by(state_dict, dtype_of), stored)


def test_a_float32_safetensors_file_is_converted_in_place_and_a_float16_one_left_as_published(tmp_path):
    full, half = tmp_path / "full" / "model.safetensors", tmp_path / "half" / "model.safetensors"
    state_dict = {"w": torch.randn(8, 8), "gate.weight": torch.randn(2)}
    for path, dtype in ((full, torch.float32), (half, torch.float16)):
        path.parent.mkdir()
        save_file({k: v.to(dtype) for k, v in state_dict.items()}, path)
    published_half = half.read_bytes()
    dtype_of = tensor_dtype_rule(torch.nn.Module, torch.float16)

    assert convert_checkpoint(full, dtype_of) == full
    assert convert_checkpoint(half, dtype_of) == half

    assert_bit_identical(cast_by(state_dict, dtype_of), load_file(full))
    with safe_open(full, framework="pt") as f:
        assert f.metadata()["show1.converted_from"] == "model.safetensors"
    assert half.read_bytes() == published_half


def test_conversion_refuses_a_pickle_that_is_not_a_flat_state_dict(tmp_path):
    pickle = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"state_dict": {"w": torch.ones(2)}}, pickle)
    with pytest.raises(ConversionError, match="not a flat dictionary of tensors"):
        convert_checkpoint(pickle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.bin"]


def test_failed_conversion_keeps_the_pickle_and_leaves_no_half_file(tmp_path, monkeypatch):
    pickle = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, pickle)

    def differs(*args):
        raise ConversionError("tensor w changed")

    monkeypatch.setattr(conversion, "_check_converted", differs)
    with pytest.raises(ConversionError):
        convert_checkpoint(pickle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_pytorch_model.bin"]


def test_index_is_not_converted_before_its_shards(tmp_path):
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(ConversionError, match="shards not converted yet: model-00001-of-00001.safetensors"):
        convert_index(index)
    assert index.exists() and not (tmp_path / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------------------------------------
# The image: weights baked in, local state left out


def dockerignored(path, patterns) -> bool:
    """Whether Docker's build context leaves `path` out (its pattern rules, simplified: a pattern
    matches the path or one of its parent folders, "**/" matches any number of folders)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        variants = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            return True
    return False


def test_dockerignore_keeps_the_weights_and_drops_caches_and_test_artefacts():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]
    for kept in ("weights/manifest.json", "weights/show-1-base/unet/diffusion_pytorch_model.safetensors",
                 "show1/weights/preparation/download.py", "show1/components.py", "predict.py", "script/download-weights", "requirements.txt"):
        assert not dockerignored(kept, patterns), kept
    for dropped in ("weights/show-1-sr2/.cache/huggingface/download/unet/x.incomplete",
                    "weights/show-1-base/unet/.partial-0a1b2c3d-diffusion_pytorch_model.safetensors",
                    ".venv/bin/python", "show1/weights/preparation/__pycache__/download.cpython-311.pyc", ".git/HEAD",
                    "tests/fixtures/reference/weights/show-1-base/model_index.json", "outputs/video.mp4",
                    ".pytest_cache/README.md", "bench/random_weights.py", "bench/configs/tiny.json"):
        assert dockerignored(dropped, patterns), dropped


def test_download_script_is_executable():
    assert os.access(DOWNLOAD_SCRIPT, os.X_OK)
