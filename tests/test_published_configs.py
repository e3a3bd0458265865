"""bench/configs/published.json: the full-size configs of every network of the cascade.

Everything runs on the meta device: no weights are allocated and nothing is downloaded.
The configs must build with the class each repo's model_index.json names, keep exactly the keys
of the tiny configs (bench/configs/tiny.json, which were made by shrinking the published files),
and give the parameter counts of the published checkpoints.
"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.random_weights import CONFIGS, folder_class, published_configs, random_network, tiny_repos
from show1.components import NETWORKS as COMPONENT_NETWORKS

PUBLISHED = published_configs()
TINY = tiny_repos()

NETWORKS = [(repo, folder) for repo, folders in PUBLISHED.items() for folder in folders]

# Parameter counts of the published checkpoints, with the tolerance their source allows.
# (expected parameters, relative tolerance, where the number comes from)
EXPECTED_PARAMETERS = {
    # showlab/show-1-base unet/diffusion_pytorch_model.bin is float16, 3.45 GB on the Hub
    # (also huggingface.co/showlab/show-1-base-0.0, same architecture): 3.45e9 / 2 bytes.
    ("show-1-base", "unet"): (1.725e9, 0.005, "show-1-base unet fp16 file, 3.45 GB"),
    # Same architecture with 7 input channels (4 x 320 x 3 x 3 more conv_in weights).
    ("show-1-interpolation", "unet"): (1.725e9, 0.005, "base UNet + 4 input channels"),
    # T5 v1.1 XXL encoder (DeepFloyd IF's text encoder): 4.76 B, 9.5 GB in float16
    # (Show-1 totals; d_model 4096, d_ff 10240, 24 layers, 64 heads).
    ("show-1-base", "text_encoder"): (4.76e9, 0.005, "T5-v1.1-XXL encoder, 4.76 B"),
    # DeepFloyd/IF-II-L-v1.0 model card: "Num Parameters: 1.2B" (rounded to 0.1 B).
    ("IF-II-L-v1.0", "unet"): (1.2e9, 0.05, "IF-II-L model card, 1.2B"),
    # Show-1 totals: sr1 UNet 0.80 B (no file size found).
    ("show-1-sr1", "unet"): (0.80e9, 0.01, "Show-1 totals, 0.80 B"),
    # cerspense/zeroscope_v2_576w unet/diffusion_pytorch_model.bin is float16, 2.82 GB.
    ("show-1-sr2", "unet"): (1.41e9, 0.005, "zeroscope_v2_576w unet fp16 file, 2.82 GB"),
    # Stable Diffusion / zeroscope VAE, vae/diffusion_pytorch_model.bin float16, 167 MB.
    ("show-1-sr2", "vae"): (83.5e6, 0.01, "zeroscope VAE fp16 file, 167 MB"),
    # OpenCLIP ViT-H/14 text tower as CLIPTextModel: 340 M (Show-1 totals; 24 - 1 layers).
    ("show-1-sr2", "text_encoder"): (340e6, 0.01, "Show-1 totals, 340 M"),
}

# Exact counts of the configs as written (a change to a config must be deliberate).
EXACT_PARAMETERS = {
    ("show-1-base", "unet"): 1_726_848_390,
    ("show-1-interpolation", "unet"): 1_726_859_910,
    ("show-1-base", "text_encoder"): 4_762_310_656,
    ("IF-II-L-v1.0", "unet"): 1_243_277_190,
    ("show-1-sr1", "unet"): 796_343_046,
    ("show-1-sr2", "unet"): 1_411_233_860,
    ("show-1-sr2", "vae"): 83_653_863,
    ("show-1-sr2", "text_encoder"): 340_387_840,
}


def build(repo, folder):
    """One network from its published config, on the meta device, with the class its repo's
    model_index.json names (float32: the parameter counts and FLOPs do not depend on the dtype)."""
    return random_network(folder_class(TINY, repo, folder), PUBLISHED[repo][folder], "meta", torch.float32, None)


def parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models():
    return {network: build(*network) for network in NETWORKS}


def test_every_network_of_the_cascade_is_there():
    assert set(NETWORKS) == set(EXPECTED_PARAMETERS) == {(c.repo, c.folder) for c in COMPONENT_NETWORKS}
    networks_in_tiny = {
        (repo, folder) for repo, tiny in TINY.items() for folder in tiny["folders"]
        if folder in ("unet", "vae", "text_encoder")
    }
    assert set(NETWORKS) == networks_in_tiny


def test_file_format():
    text = (CONFIGS / "published.json").read_text(encoding="utf-8")
    assert text == json.dumps(PUBLISHED, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("repo, folder", NETWORKS)
def test_keys_equal_the_tiny_configs(repo, folder):
    assert set(PUBLISHED[repo][folder]) == set(TINY[repo]["folders"][folder]["config"])


@pytest.mark.parametrize("repo, folder", NETWORKS)
def test_class_names_match_the_model_index(repo, folder):
    config = PUBLISHED[repo][folder]
    _, name = TINY[repo]["model_index"][folder]
    if "_class_name" in config:
        assert config["_class_name"] == name
    else:
        assert config["architectures"] == [name]


@pytest.mark.parametrize("repo, folder", NETWORKS)
def test_builds_on_meta_with_the_published_parameter_count(models, repo, folder):
    model = models[(repo, folder)]
    assert all(p.device.type == "meta" for p in model.parameters())
    count = parameters(model)
    expected, tolerance, source = EXPECTED_PARAMETERS[(repo, folder)]
    assert abs(count - expected) <= tolerance * expected, f"{count:,} vs {expected:,.0f} ({source})"
    assert count == EXACT_PARAMETERS[(repo, folder)]


def test_interpolation_unet_is_the_base_unet_with_seven_input_channels():
    base, interpolation = PUBLISHED["show-1-base"]["unet"], PUBLISHED["show-1-interpolation"]["unet"]
    differing = {key for key in base if base[key] != interpolation[key]}
    tiny_base = TINY["show-1-base"]["folders"]["unet"]["config"]
    tiny_interpolation = TINY["show-1-interpolation"]["folders"]["unet"]["config"]
    tiny_differing = {key for key in tiny_base if tiny_base[key] != tiny_interpolation[key]}
    assert differing == tiny_differing == {"in_channels", "_diffusers_version"}
    assert (base["in_channels"], interpolation["in_channels"]) == (3, 7)
    assert interpolation["out_channels"] == base["out_channels"] == 6


def tflop(model, *args, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops() / 1e12


def meta(*shape):
    return torch.empty(*shape, device="meta")


# TFLOP of one forward at the reference shapes (batch 2 for guidance), from
# the FLOPs in docs/performance.md, 'Measurements'. Matching these to 2 decimals is strong evidence that
# the sizes (and the head arithmetic's inputs) are right.
FLOP_TABLE = {
    "show-1-base": ((2, 3, 8, 40, 64), None, 10.47),
    "show-1-interpolation": ((2, 7, 5, 40, 64), None, 6.55),
    "IF-II-L-v1.0": ((2, 6, 160, 256), 250, 3.85),
    "show-1-sr1": ((2, 6, 8, 160, 256), 250, 26.17),
    # sr2: 51.7 without attention (docs/performance.md); since the padded-heads processor
    # (show1.attention) the counter also sees its attention, at the padded head widths.
    "show-1-sr2": ((2, 4, 29, 40, 72), None, 53.95),
}


@pytest.mark.parametrize("repo", FLOP_TABLE)
def test_unet_flops_match_the_performance_floor_table(models, repo):
    shape, noise_level, expected = FLOP_TABLE[repo]
    width = PUBLISHED["show-1-sr2"]["text_encoder"]["hidden_size"] if repo == "show-1-sr2" else 4096
    kwargs = {"encoder_hidden_states": meta(2, 77, width)}
    if noise_level is not None:
        kwargs["class_labels"] = torch.full((2,), noise_level, device="meta", dtype=torch.long)
    measured = tflop(models[(repo, "unet")], meta(*shape), torch.tensor(500, device="meta"), **kwargs)
    assert measured == pytest.approx(expected, abs=0.051 if repo == "show-1-sr2" else 0.0051)


def test_t5_flops_match_the_performance_floor_table(models):
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    assert tflop(models[("show-1-base", "text_encoder")], ids) == pytest.approx(1.43, abs=0.0051)
