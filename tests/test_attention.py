"""Attention on every GPU.

On CUDA the image stages may only use fused attention kernels: a math fallback must raise instead
of building sr2's attention matrices (about 231 GiB for one forward). And every UNet pads its heads
to a multiple of 8, which every fused kernel accepts: exactly, so padded attention equals
unpadded attention and diffusers' own processors, checked here on the CPU."""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor, AttnProcessor2_0
from torch._subclasses.fake_tensor import FakeTensorMode

import show1.pipeline as pipeline_module
from bench.fake_memory import FlashAttentionStandIn
from bench.random_weights import folder_class, network_config, published_configs, random_network, tiny_repos
from conftest import REFERENCE_WEIGHTS
from show1.attention import (
    PaddedHeadsAddedKVProcessor,
    PaddedHeadsAttnProcessor,
    fused_attention,
    head_width,
    padded_attention,
    split_padded_heads,
    use_padded_attention,
)
from show1.weights.loading import build_network, load_diffusers_model

PADDED_PROCESSOR_CLASSES = (PaddedHeadsAttnProcessor, PaddedHeadsAddedKVProcessor)


def test_on_cuda_the_math_fallback_is_switched_off_and_restored_after():
    assert torch.backends.cuda.math_sdp_enabled()
    with fused_attention("cuda"):
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()


def test_on_the_cpu_nothing_changes():
    with fused_attention(torch.device("cpu")):
        assert torch.backends.cuda.math_sdp_enabled()


def test_every_image_stage_runs_under_fused_attention_and_text_encoding_does_not(tiny_pipeline, small_keyframes,
                                                                                 monkeypatch):
    """The text encoders attend over 77 tokens and T5 passes its position bias as a mask: they are
    left to any kernel. Every stage with image-sized attention checks its output inside the context.
    (Small keyframes, conftest.SMALL_KEYFRAMES: which context a stage runs in does not depend on
    the frame size.)"""
    inside, calls = [], []

    @contextmanager
    def recording_fused_attention(device):
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    def recorder(name, function):
        def record(*args, **kwargs):
            calls.append((name if name != "check_finite" else args[0], bool(inside)))
            return function(*args, **kwargs)

        return record

    monkeypatch.setattr(pipeline_module, "fused_attention", recording_fused_attention)
    monkeypatch.setattr(pipeline_module.text, "run", recorder("text", pipeline_module.text.run))
    monkeypatch.setattr(pipeline_module, "check_finite", recorder("check_finite", pipeline_module.check_finite))
    tiny_pipeline("a cat", keyframe_steps=1, interpolation_steps=1, output_stage="interpolated")
    assert calls == [("text", False), ("text", False), ("keyframes", True), ("interpolation", True)]


# Padding the heads


def unet_folders():
    """(repo, folder, class) of every UNet of the cascade, from the published model indexes."""
    repos = tiny_repos()
    return [(repo, folder, folder_class(repos, repo, folder))
            for repo, folders in published_configs().items() for folder in folders
            if "UNet" in folder_class(repos, repo, folder).__name__]


def published_unet(repo, folder, cls):
    """A UNet at its published size, on the meta device (no memory)."""
    with torch.device("meta"):
        return build_network(cls, network_config(tiny_repos(), repo, folder, "published"))


def attention_modules(network):
    return [module for module in network.modules() if isinstance(module, Attention)]


@pytest.fixture(scope="module")
def published_head_widths():
    """Every head width of the published UNets' attention (Show-1's 5 to 20, IF's 64)."""
    return sorted({head_width(module) for unet in unet_folders() for module in attention_modules(published_unet(*unet))})


def unpadded_attention(query, key, value, heads):
    """Plain attention of [B, S, heads * width] projections, heads split without padding."""
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    return F.scaled_dot_product_attention(split(query), split(key), split(value)).transpose(1, 2).flatten(2)


def test_padded_attention_equals_unpadded_for_every_published_head_width(published_head_widths, monkeypatch):
    assert any(width % 8 for width in published_head_widths), published_head_widths
    widths_seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        widths_seen.append(query.shape[-1])
        return sdpa(query, key, value, **kwargs)

    generator = torch.Generator().manual_seed(0)
    heads = 3
    for width in published_head_widths:
        query, key, value = (torch.randn(2, length, heads * width, generator=generator) for length in (20, 13, 13))
        expected = unpadded_attention(query, key, value, heads)
        with monkeypatch.context() as patch:
            patch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
            padded = padded_attention(*(split_padded_heads(t, heads) for t in (query, key, value)), width)
        torch.testing.assert_close(padded, expected, rtol=1e-6, atol=1e-6, msg=f"head width {width}")
    # The kernel saw each width rounded up to a multiple of 8, and only those not one already.
    assert widths_seen == [-(-width // 8) * 8 for width in published_head_widths]


def plain_attention(width, kind):
    """An Attention module as Show-1's transformers (self, cross) or a VAE (image) build it."""
    if kind == "image":
        return Attention(query_dim=4 * width, heads=4, dim_head=width, norm_num_groups=2, residual_connection=True,
                         rescale_output_factor=2.0, bias=True, upcast_softmax=True)
    return Attention(query_dim=4 * width, heads=4, dim_head=width, cross_attention_dim=24 if kind == "cross" else None)


def added_kv_attention(width, only_cross_attention, cross_attention_norm):
    """An Attention module as IF's (and Show-1's) SimpleCrossAttn blocks build it."""
    return Attention(query_dim=4 * width, cross_attention_dim=4 * width, heads=4, dim_head=width, added_kv_proj_dim=32,
                     norm_num_groups=2, bias=True, upcast_softmax=True, only_cross_attention=only_cross_attention,
                     cross_attention_norm=cross_attention_norm, cross_attention_norm_num_groups=8,
                     processor=AttnAddedKVProcessor2_0())


CASES = {
    "self": (lambda w: plain_attention(w, "self"), (2, 12), None),
    "cross": (lambda w: plain_attention(w, "cross"), (2, 12), (2, 7, 24)),
    "image": (lambda w: plain_attention(w, "image"), (2, None, 3, 4), None),
    "added_kv": (lambda w: added_kv_attention(w, False, None), (2, None, 3, 4), (2, 7, 32)),
    "added_kv_group_norm": (lambda w: added_kv_attention(w, False, "group_norm"), (2, None, 3, 4), (2, 7, 32)),
    "added_kv_cross_only": (lambda w: added_kv_attention(w, True, "group_norm"), (2, None, 3, 4), (2, 7, 32)),
}


@pytest.mark.parametrize("width", [5, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_padded_processor_computes_what_diffusers_processor_computes(case, width):
    make, input_shape, encoder_shape = CASES[case]
    torch.manual_seed(0)
    diffusers_module = make(width).eval()
    with torch.no_grad():  # norms away from the identity, so a missed norm shows
        for name, parameter in diffusers_module.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter))
    channels = diffusers_module.query_dim
    if len(input_shape) == 2:
        hidden_states = torch.randn(*input_shape, channels)
    else:
        hidden_states = torch.randn(input_shape[0], channels, *input_shape[2:])
    encoder_hidden_states = torch.randn(encoder_shape) if encoder_shape else None
    padded_module = use_padded_attention(copy.deepcopy(diffusers_module))
    assert isinstance(diffusers_module.processor, (AttnProcessor2_0, AttnAddedKVProcessor2_0))
    assert isinstance(padded_module.processor, PADDED_PROCESSOR_CLASSES)
    with torch.no_grad():
        expected = diffusers_module(hidden_states, encoder_hidden_states)
        actual = padded_module(hidden_states, encoder_hidden_states)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_features_the_padded_processors_do_not_compute_are_refused():
    with pytest.raises(ValueError, match="query/key norms"):
        use_padded_attention(Attention(query_dim=40, heads=8, dim_head=5, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="runs AttnProcessor;"):
        use_padded_attention(Attention(query_dim=40, heads=8, dim_head=5, processor=AttnProcessor()))
    attention = use_padded_attention(Attention(query_dim=40, heads=8, dim_head=5))
    with pytest.raises(ValueError, match="no attention mask"):
        attention(torch.randn(1, 6, 40), attention_mask=torch.ones(1, 6, 6, dtype=torch.bool))


def tiny_unets():
    """Every UNet of the tiny reference weights, as the pipeline loads them, and built by
    bench.random_weights (the tiny and published-size benchmark networks)."""
    repos = tiny_repos()
    generator = torch.Generator().manual_seed(0)
    for repo, folder, cls in unet_folders():
        yield f"{repo} reference", load_diffusers_model(cls, REFERENCE_WEIGHTS / repo / folder, dtype=torch.float32)
        config = network_config(repos, repo, folder, "tiny")
        yield f"{repo} random", random_network(cls, config, "cpu", torch.float32, generator)


def test_every_attention_of_every_unet_pads_its_heads():
    for name, unet in tiny_unets():
        modules = attention_modules(unet)
        assert modules, name
        assert all(isinstance(module.processor, PADDED_PROCESSOR_CLASSES) for module in modules), name


# Counting the calls that would need the flash kernel


def fake_forward_calls_needing_flash(unet):
    """Attention calls with heads not a multiple of 8 in one forward of `unet` (on the meta device),
    on fake tensors at a small image size."""
    config = unet.config
    text_width = config.encoder_hid_dim or config.cross_attention_dim
    stand_in = FlashAttentionStandIn()
    with FakeTensorMode(allow_non_fake_inputs=True), stand_in, torch.no_grad():
        unet.to_empty(device="cpu")
        sample = torch.empty(1, config.in_channels, 2, 16, 16, dtype=torch.float16)
        class_labels = torch.tensor([250]) if config.class_embed_type else None
        unet(sample, torch.tensor(999), encoder_hidden_states=torch.empty(1, 77, text_width, dtype=torch.float16),
             class_labels=class_labels)
    return stand_in.calls_needing_flash


def with_diffusers_processors(network):
    """The network as diffusers builds it: its attention unpadded."""
    for module in attention_modules(network):
        padded_added_kv = isinstance(module.processor, PaddedHeadsAddedKVProcessor)
        module.set_processor(AttnAddedKVProcessor2_0() if padded_added_kv else AttnProcessor2_0())
    return network


@pytest.mark.parametrize("repo", ["show-1-base", "show-1-sr1", "show-1-sr2"])
def test_at_the_published_size_no_attention_call_needs_flash_and_without_padding_many_would(repo):
    def unet():  # a fresh one per forward: a network moves onto fake tensors once
        return published_unet(repo, "unet", folder_class(tiny_repos(), repo, "unet")).half()

    needing_padding = [module for module in attention_modules(unet()) if head_width(module) % 8]
    assert needing_padding
    assert fake_forward_calls_needing_flash(unet()) == 0
    # Each attention module is called once per forward.
    assert fake_forward_calls_needing_flash(with_diffusers_processors(unet())) == len(needing_padding)


def test_the_dry_run_reports_the_calls_needing_flash(published_dry_run):
    stdout, result = published_dry_run
    assert "attention_calls_needing_flash=0" in stdout.splitlines()
    assert result["attention_calls_needing_flash"] == 0
