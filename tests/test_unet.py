"""The Show-1 UNet class against the reference implementation's forward passes (tiny weights)."""

import functools
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

from conftest import EXPECTED, REFERENCE_WEIGHTS, expected
from show1.weights.loading import load_diffusers_model
from show1.models import UNet3DConditionModel

UNETS = {
    "base": ("show-1-base", UNet3DConditionModel),
    "interpolation": ("show-1-interpolation", UNet3DConditionModel),
    "sr1": ("show-1-sr1", UNet3DConditionModel),
    "sr2": ("show-1-sr2", UNet3DConditionModel),
    "if2": ("IF-II-L-v1.0", UNet2DConditionModel),
}


def load_unet(name, dtype=torch.float32):
    repo, cls = UNETS[name]
    return load_diffusers_model(cls, REFERENCE_WEIGHTS / repo / "unet", dtype=dtype)


# Allowed error of one forward pass, relative to the largest value of the reference output. Float32
# summation order differs between CPUs (AVX-512 on Intel, AVX2 on AMD EPYC): the largest error seen
# is 1.27e-4 on an EPYC for sr1, whose output reaches 3.7, i.e. 3.5e-5 of it. A wrong head split
# or a wrong output scale factor is off by about 1 (test_the_bound_catches_...).
RELATIVE_BOUND = 1e-4


def forward(name, unet):
    """One forward of `unet` on the reference fixture's inputs for UNet `name`, as float32."""
    data = expected(f"unet_{name}")
    class_labels = torch.from_numpy(data["class_labels"]) if "class_labels" in data else None
    with torch.no_grad():
        return unet(
            torch.from_numpy(data["sample"]).to(unet.dtype),
            torch.from_numpy(data["timestep"]),
            encoder_hidden_states=torch.from_numpy(data["encoder_hidden_states"]).to(unet.dtype),
            class_labels=class_labels,
        ).sample.float()


@functools.lru_cache(maxsize=None)
def float32_forward(name):
    """The float32 forward of the published UNet `name` (`forward`), computed once per session: it
    is checked against the reference here and is what test_half_precision measures half precision
    against. Read-only."""
    return forward(name, load_unet(name))


def forward_error(name, out):
    """(max abs error of a forward's output against the reference's, the bound it must stay within)."""
    reference = torch.from_numpy(expected(f"unet_{name}")["output"])
    assert out.shape == reference.shape
    return (out - reference).abs().max().item(), RELATIVE_BOUND * reference.abs().max().item()


@pytest.mark.parametrize("name", sorted(UNETS))
def test_forward_matches_reference(name):
    error, bound = forward_error(name, float32_forward(name))
    print(f"unet {name}: max abs error {error:.2e}, bound {bound:.2e} ({RELATIVE_BOUND:g} x max |reference|)")
    assert error <= bound


def swap_temporal_heads(unet):
    """Diffusers' own 3-D head split: heads of `attention_head_dim` channels instead of Show-1's
    `attention_head_dim` heads."""
    for module_name, module in unet.named_modules():
        if isinstance(module, Attention) and _kind(module_name) == "temporal":
            module.heads = module.to_q.out_features // module.heads


def drop_output_scale_factors(unet):
    """Resnets that forget IF's sqrt(2) output scale."""
    for module in unet.modules():
        if hasattr(module, "output_scale_factor"):
            module.output_scale_factor = 1.0


@pytest.mark.parametrize("mistake", [swap_temporal_heads, drop_output_scale_factors])
def test_the_bound_catches_a_wrong_head_split_or_scale_factor(mistake):
    unet = load_unet("sr1")
    mistake(unet)
    error, bound = forward_error("sr1", forward("sr1", unet))
    print(f"unet sr1 with {mistake.__name__}: max abs error {error:.2e}, bound {bound:.2e}")
    assert error > 100 * bound


def test_diffusers_from_pretrained_loads_the_same_network_and_returns_a_video_shaped_sample():
    """The class is a diffusers ModelMixin: diffusers' own from_pretrained loads a published folder
    into the tensors the project's strict loader reads."""
    unet = UNet3DConditionModel.from_pretrained(REFERENCE_WEIGHTS / "show-1-base" / "unet", torch_dtype=torch.float32)
    assert not unet.training
    strict = load_unet("base").state_dict()
    assert unet.state_dict().keys() == strict.keys()
    assert all(torch.equal(t, strict[name]) for name, t in unet.state_dict().items())
    sample = torch.randn(1, 3, 2, 16, 24)
    out = unet(sample, 10, encoder_hidden_states=torch.randn(1, 77, 64)).sample
    assert out.shape == (1, 6, 2, 16, 24)


def _heads(module):
    return module.heads, module.to_q.out_features // module.heads


@pytest.mark.parametrize("name", ["base", "sr1", "sr2"])
def test_head_arithmetic_is_show1s(name):
    """Heads read off the reference's modules; diffusers' own 3-D blocks would give other numbers."""
    table = json.loads((EXPECTED / "settings.json").read_text())["attention_heads_read_from_modules"][name]
    unet = load_unet(name)
    for row in table:
        assert _heads(unet.get_submodule(row["example_module"])) == (row["heads"], row["head_size"])
    expected_heads = {(row["kind"], row["inner_dim"]): (row["heads"], row["head_size"]) for row in table}
    checked = 0
    for module_name, module in unet.named_modules():
        if isinstance(module, Attention) and not module_name.endswith("attn2"):
            key = (_kind(module_name), module.to_q.out_features)
            if key in expected_heads:
                assert _heads(module) == expected_heads[key], module_name
                checked += 1
    assert checked == sum(row["count"] for row in table)


def _kind(module_name):
    if "temp_attentions" in module_name or module_name.startswith("transformer_in"):
        return "temporal"
    return "spatial"


@pytest.mark.parametrize("name", sorted(UNETS))
def test_every_attention_uses_fused_sdpa(name):
    """A plain attention matrix of the 576x320 stage would need ~62 GB; SDPA processors never build it.
    The project's processors are SDPA processors with heads padded for every fused kernel."""
    processors = {type(m.processor).__name__ for m in load_unet(name).modules() if isinstance(m, Attention)}
    assert processors and processors <= {"PaddedHeadsAttnProcessor", "PaddedHeadsAddedKVProcessor"}, processors


@pytest.mark.parametrize("name", ["base", "sr2"])
def test_one_video_under_two_rows_of_text_equals_the_video_given_twice(name):
    """The guidance batch (show1.sampling.predict_noise) gives each video once with its two rows of
    text: the UNet runs conv_in (and sr2's transformer_in) once and repeats its output. Base's text
    also enters its time embedding; sr2's first temporal transformer is the costly layer shared."""
    data = expected(f"unet_{name}")
    # A crop of the fixture's first video: what is shared does not depend on the size.
    video = torch.from_numpy(data["sample"][:1, :, :3, :16, :24])
    text = torch.from_numpy(data["encoder_hidden_states"])
    unet = load_unet(name)
    with torch.no_grad():
        once = unet(video, 500, encoder_hidden_states=text).sample
        twice = unet(torch.cat([video, video]), 500, encoder_hidden_states=text).sample
        with pytest.raises(ValueError, match="3 rows of text states for 2 videos"):
            unet(torch.cat([video, video]), 500, encoder_hidden_states=torch.cat([text, text[:1]]))
    assert once.shape == twice.shape == (2, data["output"].shape[1], 3, 16, 24)
    torch.testing.assert_close(once, twice, rtol=0, atol=1e-5)
    assert (once[0] - once[1]).abs().max() > 1e-2  # the two rows of text do give two outputs


def temporal_chunk_sizes(unet) -> set:
    """The feed-forward chunk size of every temporal transformer block of `unet`."""
    return {block._chunk_size for module in unet.modules() if isinstance(module, TransformerTemporalModel)
            for block in module.transformer_blocks}


def test_feed_forward_frame_by_frame_computes_the_same():
    unet = load_unet("sr2")
    sample, text = torch.randn(2, 4, 5, 16, 24), torch.randn(2, 77, 64)
    with torch.no_grad():
        whole = unet(sample, 799, encoder_hidden_states=text).sample
        unet.feed_forward_frame_by_frame()
        assert temporal_chunk_sizes(unet) == {1}
        by_frame = unet(sample, 799, encoder_hidden_states=text).sample
    torch.testing.assert_close(by_frame, whole, rtol=0, atol=1e-5)


def test_a_pipeline_on_the_cpu_runs_feed_forwards_frame_by_frame_and_one_elsewhere_does_not():
    from bench.random_weights import random_components
    from show1 import Show1Pipeline

    components = random_components("tiny", "cpu", torch.float32)
    unets = [n for n in components.networks() if isinstance(n, UNet3DConditionModel)]
    assert len(unets) == 4
    Show1Pipeline(components, "cuda")  # only built: nothing runs
    assert {size for unet in unets for size in temporal_chunk_sizes(unet)} == {None}
    Show1Pipeline(components, "cpu")
    assert {size for unet in unets for size in temporal_chunk_sizes(unet)} == {1}
