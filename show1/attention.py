"""Attention on every GPU: fused kernels only, and heads every fused kernel accepts.

Fused kernels only. With Show-1's head arithmetic the sr2 UNet's attention heads are 5, 10 and 20
wide. PyTorch's math fallback for scaled_dot_product_attention materialises the attention matrix:
about 231 GiB for one sr2 forward, against 3.3 GiB with the flash kernel. A silent fallback would be
an out-of-memory error deep inside the last stage; `fused_attention` restricts the backends so that
it becomes an immediate, explicit error ("No available kernel") at the first attention call.

Heads padded to a multiple of 8. The Show-1 UNets' heads are 5, 10, 12, 15 and 20 wide. Of the
fused kernels only flash pads such heads itself, and flash needs sm80 or newer: on a T4 the
memory-efficient and cuDNN kernels refuse half-precision heads of these widths, and every prediction
would fail at its first attention. The processors below therefore append zero columns to q, k and v
before the call and slice the output's extra columns off after it, with the softmax scale of the
true width. That is exact: a zero column adds nothing to q.k, so the attention weights are
unchanged, and the output's extra columns are weighted sums of zeros. They compute what diffusers'
AttnProcessor2_0 and AttnAddedKVProcessor2_0 compute, for the features Show-1's networks use, and
refuse the others. `use_padded_attention` installs them on a network: every Show-1 UNet
(show1.models) and IF-II's UNet (show1.weights.loading) get them when built.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

# The memory-efficient and cuDNN kernels take half-precision heads whose width is a multiple of 8.
HEAD_WIDTH_MULTIPLE = 8


def fused_attention(device):
    """A context in which every attention call on a CUDA `device` runs a fused kernel or raises.
    On the CPU (tests, tiny networks) nothing changes."""
    if torch.device(device).type == "cuda":
        return sdpa_kernel(FUSED_BACKENDS)
    return nullcontext()


# Padded attention


def padded_width(width: int) -> int:
    """The head width rounded up to a multiple of HEAD_WIDTH_MULTIPLE."""
    return -(-width // HEAD_WIDTH_MULTIPLE) * HEAD_WIDTH_MULTIPLE


def split_padded_heads(projection, heads):
    """[B, S, heads * width] -> [B, heads, S, padded width], zero columns after each head's own.
    A padded result is a new tensor: callers that pass the projection straight in, keeping no
    reference, free the unpadded one as soon as the padded copy exists."""
    per_head = projection.unflatten(-1, (heads, -1))  # [B, S, heads, width], a view
    width = per_head.shape[-1]
    if width != padded_width(width):
        per_head = F.pad(per_head, (0, padded_width(width) - width))
    return per_head.transpose(1, 2)


def padded_attention(query, key, value, width):
    """Attention of heads padded by split_padded_heads, whose true width is `width`: [B, S, heads * width].
    The scale is that of the true width; the kernel's default would be that of the padded one."""
    out = F.scaled_dot_product_attention(query, key, value, scale=width**-0.5)
    return out[..., :width].transpose(1, 2).flatten(2)


def head_width(attn: Attention) -> int:
    """The true width of the module's heads, read at call time (tests change `heads`)."""
    return attn.to_q.out_features // attn.heads


def refuse_mask(attention_mask):
    # No Show-1 network passes one; a mask would need its own shape checks.
    if attention_mask is not None:
        raise ValueError("The padded attention processors take no attention mask")


def attend_to_context(attn: Attention, hidden_states, keys, values):
    """Padded attention of `hidden_states` [B, S, C] (queries) to the concatenated `keys` and
    `values` projections [B, S_i, C], then the output projection: [B, S, C]. Callers hand the
    projection lists over without keeping them, so each unpadded projection is freed once its
    padded copy exists."""
    query = split_padded_heads(attn.to_q(hidden_states), attn.heads)
    key = split_padded_heads(keys[0] if len(keys) == 1 else torch.cat(keys, dim=1), attn.heads)
    del keys
    value = split_padded_heads(values[0] if len(values) == 1 else torch.cat(values, dim=1), attn.heads)
    del values
    hidden_states = padded_attention(query, key, value, head_width(attn))
    del query, key, value
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)  # dropout


def tokens_of(image):
    """[B, C, H, W] (or any [B, C, ...]) -> [B, H*W, C], a view."""
    return image.flatten(2).transpose(1, 2)


def normed_tokens(attn: Attention, tokens):
    """The attention's group norm over channels of [B, S, C] tokens."""
    return attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)


def encoder_context(attn: Attention, encoder_hidden_states):
    if attn.norm_cross is not None:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


class PaddedHeadsAttnProcessor:
    """Self- or cross-attention as diffusers' AttnProcessor2_0 computes it, heads padded.

    Input [B, S, C] or an image [B, C, H, W]; an optional group norm before the projections, the
    cross-attention norm on the encoder states, the residual connection and output rescaling."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None):
        refuse_mask(attention_mask)
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = tokens_of(hidden_states)
        if attn.group_norm is not None:
            hidden_states = normed_tokens(attn, hidden_states)
        # Self-attention attends to the normed tokens themselves.
        context = hidden_states if encoder_hidden_states is None else encoder_context(attn, encoder_hidden_states)

        hidden_states = attend_to_context(attn, hidden_states, [attn.to_k(context)], [attn.to_v(context)])

        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class PaddedHeadsAddedKVProcessor:
    """IF's spatial attention as diffusers' AttnAddedKVProcessor2_0 computes it, heads padded.

    Input an image [B, C, H, W]. The text gets its own key/value projections (add_k_proj,
    add_v_proj); unless the attention is cross-attention only, the group-normed image tokens are
    keys and values too, after the text's. The residual is always added."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None):
        refuse_mask(attention_mask)
        residual = hidden_states
        hidden_states = tokens_of(hidden_states)
        # Without text the added projections see the tokens before the group norm, as in diffusers.
        context = hidden_states if encoder_hidden_states is None else encoder_context(attn, encoder_hidden_states)
        hidden_states = normed_tokens(attn, hidden_states)

        hidden_states = attend_to_context(attn, hidden_states, *added_keys_and_values(attn, context, hidden_states))

        return hidden_states.transpose(1, 2).reshape(residual.shape) + residual


def added_keys_and_values(attn: Attention, context, tokens):
    """The key and value projections of the text, then (unless cross-attention only) of the tokens."""
    keys, values = [attn.add_k_proj(context)], [attn.add_v_proj(context)]
    if not attn.only_cross_attention:
        keys.append(attn.to_k(tokens))
        values.append(attn.to_v(tokens))
    return keys, values


# Installing them


# The processor each diffusers processor is replaced by; installing twice changes nothing.
PADDED_PROCESSORS = {
    AttnProcessor2_0: PaddedHeadsAttnProcessor,
    AttnAddedKVProcessor2_0: PaddedHeadsAddedKVProcessor,
    PaddedHeadsAttnProcessor: PaddedHeadsAttnProcessor,
    PaddedHeadsAddedKVProcessor: PaddedHeadsAddedKVProcessor,
}


def unsupported_features(attn: Attention) -> list:
    """The features of `attn` that the padded processors do not compute (none in Show-1's networks)."""
    features = {
        "a spatial norm": attn.spatial_norm is not None,
        "query/key norms": attn.norm_q is not None or attn.norm_k is not None,
        "fewer key/value heads than query heads": attn.inner_kv_dim != attn.inner_dim,
        "a width its head count does not divide": attn.inner_dim % attn.heads != 0,
        "joint attention projections": attn.context_pre_only is not None or attn.pre_only,
    }
    if isinstance(attn.processor, (AttnAddedKVProcessor2_0, PaddedHeadsAddedKVProcessor)):
        features["added key/values without a group norm"] = attn.group_norm is None
    return [feature for feature, present in features.items() if present]


def padded_processor_for(name, attn: Attention):
    """The padded counterpart of the processor `attn` has now; refuses what it would not compute."""
    processor_class = type(attn.processor)
    if processor_class not in PADDED_PROCESSORS:
        raise ValueError(f"Attention {name!r} runs {processor_class.__name__}; padded attention replaces only "
                         f"{', '.join(cls.__name__ for cls in (AttnProcessor2_0, AttnAddedKVProcessor2_0))}")
    unsupported = unsupported_features(attn)
    if unsupported:
        raise ValueError(f"Attention {name!r} has {', '.join(unsupported)}: the padded attention processors "
                         "do not compute that")
    return PADDED_PROCESSORS[processor_class]()


def use_padded_attention(network):
    """Every Attention module of `network` gets the padded counterpart of its processor, so that
    every fused kernel accepts every attention call. Returns the network."""
    for name, module in network.named_modules():
        if isinstance(module, Attention):
            module.set_processor(padded_processor_for(name, module))
    return network
