"""DIR/manifest.json: what it records, the full check of script/verify-weights and the cheap
start-up check, each naming every missing, truncated or altered file."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE_WEIGHTS
from show1.files import written_atomically
from show1.weights import manifest
from show1.weights.layout import WeightsError, required_files
from show1.weights.manifest import check_manifest_sizes, read_manifest, verify_manifest, write_manifest
from show1.weights.preparation import verify

VERIFY_SCRIPT = Path(__file__).resolve().parent.parent / "script" / "verify-weights"

UNET = "show-1-sr2/unet/diffusion_pytorch_model.bin"
TOKENIZER = "show-1-base/tokenizer/spiece.model"
CONFIG = "IF-II-L-v1.0/unet/config.json"


@pytest.fixture
def weights(tmp_path) -> Path:
    """A copy of the tiny weights with a manifest."""
    path = tmp_path / "weights"
    shutil.copytree(REFERENCE_WEIGHTS, path)
    write_manifest(path)
    return path


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def change_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (UNET, truncate, f"{UNET}: truncated"),
    "missing": (TOKENIZER, Path.unlink, f"{TOKENIZER}: missing"),
    "changed byte": (CONFIG, change_one_byte, f"{CONFIG}: altered (sha256 differs from the manifest)"),
}


def test_manifest_records_size_and_sha256_of_every_file_the_cascade_reads(weights):
    entries = read_manifest(weights)
    assert [e.path for e in entries] == [p.relative_to(weights).as_posix() for p in required_files(weights)]
    for entry in entries:
        data = (weights / entry.path).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest()), entry.path


def test_manifest_records_the_dtypes_of_each_checkpoint_and_the_precision(weights):
    dtypes = {e.path: e.dtypes for e in read_manifest(weights)}
    assert dtypes[UNET] == ("float16",)
    assert dtypes["show-1-base/text_encoder/pytorch_model-00001-of-00002.bin"] == ("float32",)
    assert dtypes["show-1-sr2/text_encoder/pytorch_model.bin"] == ("float16", "int64")
    assert dtypes["IF-II-L-v1.0/unet/diffusion_pytorch_model.fp16.safetensors"] == ("float16",)
    assert dtypes[CONFIG] == () and dtypes[TOKENIZER] == ()
    # A folder assembled by hand does not say which precision it holds.
    assert manifest.manifest_precision(weights) is None
    write_manifest(weights, precision="serving")
    assert manifest.manifest_precision(weights) == "serving"


def test_manifest_is_not_written_for_an_incomplete_folder(weights):
    (weights / "manifest.json").unlink()
    (weights / TOKENIZER).unlink()
    with pytest.raises(WeightsError, match="spiece.model"):
        write_manifest(weights)
    assert not (weights / "manifest.json").exists()


def test_verify_accepts_an_intact_folder(weights, capsys):
    assert verify.main([str(weights)]) == 0
    assert f"OK: {len(required_files(weights))} files in {weights} match manifest.json" in capsys.readouterr().out


def test_verify_script_names_a_truncated_file(weights):
    truncate(weights / UNET)
    # The real command, run from another directory.
    result = subprocess.run([sys.executable, VERIFY_SCRIPT, weights], capture_output=True, text=True, cwd="/")
    assert result.returncode == 1
    assert f"{UNET}: truncated ({(weights / UNET).stat().st_size} of" in result.stderr
    assert f"script/download-weights {weights}" in result.stderr


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_the_damaged_file(weights, damage, capsys):
    path, harm, expected = DAMAGE[damage]
    harm(weights / path)
    assert verify.main([str(weights)]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n  - ") == 1


def test_verify_names_every_damaged_file_at_once(weights):
    for path, harm, _ in DAMAGE.values():
        harm(weights / path)
    with pytest.raises(WeightsError) as error:
        verify_manifest(weights)
    for _, _, expected in DAMAGE.values():
        assert expected in str(error.value)


def test_verify_without_a_manifest_says_how_to_get_one(tmp_path, capsys):
    shutil.copytree(REFERENCE_WEIGHTS, tmp_path / "weights")
    assert verify.main([str(tmp_path / "weights")]) == 1
    err = capsys.readouterr().err
    assert "manifest.json does not exist" in err and "script/download-weights" in err


def test_verify_catches_a_manifest_that_leaves_out_a_file_the_cascade_reads(weights):
    data = json.loads((weights / "manifest.json").read_text())
    data["files"] = [e for e in data["files"] if e["path"] != CONFIG]
    (weights / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=f"{CONFIG}: read by the cascade but not in the manifest"):
        verify_manifest(weights)


def test_size_check_names_missing_and_truncated_files_and_the_fix(weights):
    truncate(weights / UNET)
    (weights / TOKENIZER).unlink()
    with pytest.raises(WeightsError) as error:
        check_manifest_sizes(weights)
    message = str(error.value)
    assert f"{UNET}: truncated" in message and f"{TOKENIZER}: missing" in message
    assert f"Run `script/download-weights {weights}`" in message


def test_size_check_accepts_an_intact_folder(weights):
    assert check_manifest_sizes(weights) is None


def test_size_check_does_not_read_contents(weights):
    # The start-up check compares sizes only (hashing 25+ GB on every start would take minutes);
    # a same-size change is verify-weights' job.
    change_one_byte(weights / CONFIG)
    check_manifest_sizes(weights)
    with pytest.raises(WeightsError, match="altered"):
        verify_manifest(weights)


def test_size_check_without_a_manifest_does_nothing():
    assert not (REFERENCE_WEIGHTS / "manifest.json").exists()
    assert check_manifest_sizes(REFERENCE_WEIGHTS) is None


@pytest.mark.parametrize("content, error", [
    ("{not json", "is not a valid weights manifest"),
    # Version 1 manifests described folders in published dtypes, before conversion to serving ones.
    ('{"version": 1, "files": []}', "version 1, expected 2"),
    ('{"version": 2, "files": [{"path": "a"}]}', "is not a valid weights manifest"),
    ('{"version": 2, "files": [{"path": "../outside", "size": 1, "sha256": "0"}]}', "not a path inside the weights folder"),
    ('{"version": 2, "files": [{"path": "/etc/passwd", "size": 1, "sha256": "0"}]}', "not a path inside the weights folder"),
])
def test_a_malformed_manifest_is_a_clear_error(weights, content, error):
    (weights / "manifest.json").write_text(content)
    with pytest.raises(WeightsError, match=error):
        check_manifest_sizes(weights)


def test_written_atomically_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "file.json"
    with pytest.raises(RuntimeError):
        with written_atomically(target) as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
