"""The 3-D blocks of the Show-1 UNet, built from diffusers' 2-D parts with temporal layers between them.

Every block is a stack of layers. A layer is

    resnet -> temporal conv [-> spatial attention -> temporal attention]

and a down (up) block ends with an optional down (up) sampler. All 2-D parts run on frames
flattened into the batch, [B*F, C, H, W]; the temporal parts receive `num_frames` to undo that.

Two families of blocks share this shape:

- IF style (`SimpleCrossAttn*`, `Resnet*`, used by the three pixel UNets): spatial attention is an
  `Attention` with added K/V projections of the text, resnets carry `skip_time_act` and the
  output scale factor, and resampling is done by resnets with `down=True` / `up=True`.
- zeroscope style (`CrossAttn*` and plain blocks, used by the latent sr2 UNet): spatial attention is a
  `Transformer2DModel`, resampling is done by convolutions.

The head arithmetic is Show-1's and differs from diffusers' own 3-D blocks: with
`n = attention_head_dim` from the config, the temporal attention (all blocks) and the spatial
transformer (CrossAttn blocks) have n heads of size C // n, while the added-K/V spatial attention
has C // n heads of size n. The parameter shapes are the same either way; only the outputs differ.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

# Dropout of the temporal convolutions as trained; inactive in eval mode, which is how we sample.
TEMPORAL_CONV_DROPOUT = 0.1


@dataclass(frozen=True)
class BlockStyle:
    attention: Optional[str]  # None, "transformer" (zeroscope) or "added_kv" (IF)
    if_style: bool  # IF-style resnets and resnet resamplers, else conv resamplers


BLOCK_STYLES = {
    "DownBlock3D": BlockStyle(None, if_style=False),
    "UpBlock3D": BlockStyle(None, if_style=False),
    "CrossAttnDownBlock3D": BlockStyle("transformer", if_style=False),
    "CrossAttnUpBlock3D": BlockStyle("transformer", if_style=False),
    "UNetMidBlock3DCrossAttn": BlockStyle("transformer", if_style=False),
    "ResnetDownsampleBlock3D": BlockStyle(None, if_style=True),
    "ResnetUpsampleBlock3D": BlockStyle(None, if_style=True),
    "SimpleCrossAttnDownBlock3D": BlockStyle("added_kv", if_style=True),
    "SimpleCrossAttnUpBlock3D": BlockStyle("added_kv", if_style=True),
    "UNetMidBlock3DSimpleCrossAttn": BlockStyle("added_kv", if_style=True),
}


def block_style(block_type: str) -> BlockStyle:
    if block_type not in BLOCK_STYLES:
        raise ValueError(f"Unknown Show-1 block type {block_type!r}; known: {sorted(BLOCK_STYLES)}")
    return BLOCK_STYLES[block_type]


@dataclass(frozen=True)
class BlockOptions:
    """Settings shared by every block of one UNet (from its config)."""

    temb_channels: int
    eps: float
    act_fn: str
    groups: int
    time_scale_shift: str
    skip_time_act: bool  # IF-style resnets only
    resnet_out_scale_factor: float  # IF-style resnets only
    cross_attention_norm: Optional[str]
    use_linear_projection: bool
    upcast_attention: bool
    downsample_padding: int


@dataclass(frozen=True)
class LevelOptions:
    """Settings of one resolution level (configs may give them per level)."""

    attention_head_dim: int  # see the head arithmetic in the module docstring
    cross_attention_dim: int
    transformer_layers: int
    only_cross_attention: bool


def make_resnet(in_channels, out_channels, opts: BlockOptions, style: BlockStyle, output_scale_factor=None, **resample):
    if output_scale_factor is None:
        output_scale_factor = opts.resnet_out_scale_factor if style.if_style else 1.0
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=opts.temb_channels,
        eps=opts.eps,
        groups=opts.groups,
        dropout=0.0,
        time_embedding_norm=opts.time_scale_shift,
        non_linearity=opts.act_fn,
        output_scale_factor=output_scale_factor,
        skip_time_act=opts.skip_time_act if style.if_style else False,
        **resample,
    )


def make_spatial_attention(channels, style: BlockStyle, level: LevelOptions, opts: BlockOptions):
    n = level.attention_head_dim
    if style.attention == "transformer":
        return Transformer2DModel(
            n,
            channels // n,
            in_channels=channels,
            num_layers=level.transformer_layers,
            cross_attention_dim=level.cross_attention_dim,
            norm_num_groups=opts.groups,
            use_linear_projection=opts.use_linear_projection,
            only_cross_attention=level.only_cross_attention,
            upcast_attention=opts.upcast_attention,
        )
    return Attention(
        query_dim=channels,
        cross_attention_dim=channels,
        heads=channels // n,
        dim_head=n,
        added_kv_proj_dim=level.cross_attention_dim,
        norm_num_groups=opts.groups,
        bias=True,
        upcast_softmax=True,
        only_cross_attention=level.only_cross_attention,
        cross_attention_norm=opts.cross_attention_norm,
        processor=AttnAddedKVProcessor2_0(),
    )


def make_temporal_attention(channels, level: LevelOptions, opts: BlockOptions):
    n = level.attention_head_dim
    return TransformerTemporalModel(
        n,
        channels // n,
        in_channels=channels,
        num_layers=1,
        cross_attention_dim=level.cross_attention_dim,
        norm_num_groups=opts.groups,
    )


def apply_spatial_attention(attention, hidden_states, encoder_hidden_states):
    if isinstance(attention, Transformer2DModel):
        return attention(hidden_states, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return attention(hidden_states, encoder_hidden_states=encoder_hidden_states)


class LayerStack(nn.Module):
    """The layers of one down or up block; `resnet_in_channels` gives each layer's input width."""

    def __init__(self, style: BlockStyle, resnet_in_channels, channels, level: LevelOptions, opts: BlockOptions):
        super().__init__()
        num_layers = len(resnet_in_channels)
        self.resnets = nn.ModuleList(make_resnet(c, channels, opts, style) for c in resnet_in_channels)
        self.temp_convs = nn.ModuleList(
            TemporalConvLayer(channels, channels, dropout=TEMPORAL_CONV_DROPOUT) for _ in range(num_layers)
        )
        with_attention = style.attention is not None
        self.attentions = nn.ModuleList(
            make_spatial_attention(channels, style, level, opts) for _ in range(num_layers * with_attention)
        )
        self.temp_attentions = nn.ModuleList(
            make_temporal_attention(channels, level, opts) for _ in range(num_layers * with_attention)
        )

    def run_layer(self, i, hidden_states, temb, encoder_hidden_states, num_frames):
        hidden_states = self.resnets[i](hidden_states, temb)
        hidden_states = self.temp_convs[i](hidden_states, num_frames=num_frames)
        if len(self.attentions):
            hidden_states = apply_spatial_attention(self.attentions[i], hidden_states, encoder_hidden_states)
            hidden_states = self.temp_attentions[i](hidden_states, num_frames=num_frames).sample
        return hidden_states


class Show1DownBlock(LayerStack):
    def __init__(self, block_type, in_channels, out_channels, num_layers, add_downsample, level, opts):
        style = block_style(block_type)
        super().__init__(style, [in_channels] + [out_channels] * (num_layers - 1), out_channels, level, opts)
        self.downsamplers = None
        if add_downsample:
            if style.if_style:
                sampler = make_resnet(out_channels, out_channels, opts, style, down=True)
            else:
                sampler = Downsample2D(
                    out_channels, use_conv=True, out_channels=out_channels, padding=opts.downsample_padding, name="op"
                )
            self.downsamplers = nn.ModuleList([sampler])

    def forward(self, hidden_states, temb, encoder_hidden_states, num_frames):
        skips = ()
        for i in range(len(self.resnets)):
            hidden_states = self.run_layer(i, hidden_states, temb, encoder_hidden_states, num_frames)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            sampler = self.downsamplers[0]
            if isinstance(sampler, ResnetBlock2D):
                hidden_states = sampler(hidden_states, temb)
            else:
                hidden_states = sampler(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class Show1UpBlock(LayerStack):
    def __init__(self, block_type, in_channels, out_channels, prev_output_channels, num_layers, add_upsample, level, opts):
        style = block_style(block_type)
        # Layer i concatenates the previous output with one skip connection of the down path.
        skip_channels = [out_channels] * (num_layers - 1) + [in_channels]
        previous = [prev_output_channels] + [out_channels] * (num_layers - 1)
        super().__init__(style, [p + s for p, s in zip(previous, skip_channels)], out_channels, level, opts)
        self.upsamplers = None
        if add_upsample:
            if style.if_style:
                sampler = make_resnet(out_channels, out_channels, opts, style, up=True)
            else:
                sampler = Upsample2D(out_channels, use_conv=True, out_channels=out_channels)
            self.upsamplers = nn.ModuleList([sampler])

    def forward(self, hidden_states, skips, temb, encoder_hidden_states, num_frames, upsample_size=None):
        for i in range(len(self.resnets)):
            hidden_states = torch.cat([hidden_states, skips[-1 - i]], dim=1)
            hidden_states = self.run_layer(i, hidden_states, temb, encoder_hidden_states, num_frames)
        if self.upsamplers is not None:
            sampler = self.upsamplers[0]
            if isinstance(sampler, ResnetBlock2D):
                # Like the reference, a resnet upsampler doubles the size and ignores upsample_size.
                hidden_states = sampler(hidden_states, temb)
            else:
                hidden_states = sampler(hidden_states, output_size=upsample_size)
        return hidden_states


class Show1MidBlock(nn.Module):
    """resnet -> temporal conv -> spatial attention -> temporal attention -> resnet -> temporal conv."""

    def __init__(self, block_type, channels, output_scale_factor, level, opts):
        super().__init__()
        style = block_style(block_type)
        self.resnets = nn.ModuleList(
            make_resnet(channels, channels, opts, style, output_scale_factor=output_scale_factor) for _ in range(2)
        )
        self.temp_convs = nn.ModuleList(
            TemporalConvLayer(channels, channels, dropout=TEMPORAL_CONV_DROPOUT) for _ in range(2)
        )
        self.attentions = nn.ModuleList([make_spatial_attention(channels, style, level, opts)])
        self.temp_attentions = nn.ModuleList([make_temporal_attention(channels, level, opts)])

    def forward(self, hidden_states, temb, encoder_hidden_states, num_frames):
        hidden_states = self.resnets[0](hidden_states, temb)
        hidden_states = self.temp_convs[0](hidden_states, num_frames=num_frames)
        hidden_states = apply_spatial_attention(self.attentions[0], hidden_states, encoder_hidden_states)
        hidden_states = self.temp_attentions[0](hidden_states, num_frames=num_frames).sample
        hidden_states = self.resnets[1](hidden_states, temb)
        return self.temp_convs[1](hidden_states, num_frames=num_frames)
