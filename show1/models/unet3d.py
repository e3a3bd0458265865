"""The Show-1 UNet: DeepFloyd IF's 2-D conditional UNet with temporal layers in every block.

It loads the four published Show-1 UNets (base, interpolation, sr1 and the latent sr2) with their
published configs and state-dict names, and computes what the reference class computes:

- input [B, C, F, H, W]; every 2-D op runs on [B*F, C, H, W], frames of one video adjacent;
- the time embedding (+ timestep class embedding, + text embedding pooled from the RAW text states,
  before `encoder_hid_proj`) is computed once per video and repeated for each frame;
- `transfromer_in_opt` (sic, a published config key) adds a temporal transformer after conv_in
  with 8 heads of 64 whatever the channel count;
- output [B, C_out, F, H, W].

One extension: the text states may hold several rows per video (classifier-free guidance gives
each video an unconditional and a conditional row). conv_in and transformer_in read neither the
text nor the timestep, so they run once per video and their output is repeated for each row.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.utils import BaseOutput
from torch import nn

from ..attention import use_padded_attention
from .blocks import BlockOptions, LevelOptions, Show1DownBlock, Show1MidBlock, Show1UpBlock


@dataclass
class UNet3DConditionOutput(BaseOutput):
    sample: torch.Tensor  # [B, C_out, F, H, W]


def _per_level(value, levels, name):
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries for {levels} blocks")
    return values


def _require(condition, message):
    if not condition:
        raise ValueError(f"Unsupported Show-1 UNet config: {message}")


class UNet3DConditionModel(ModelMixin, ConfigMixin):
    """The Show-1 UNet. Config keys are those of the published `unet/config.json` files."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[int] = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        mid_block_type: str = "UNetMidBlock3DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        only_cross_attention: Union[bool, Sequence[bool]] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: Union[int, Sequence[int]] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: Union[int, Sequence[int]] = 1280,
        transformer_layers_per_block: Union[int, Sequence[int]] = 1,
        encoder_hid_dim: Optional[int] = None,
        encoder_hid_dim_type: Optional[str] = None,
        attention_head_dim: Union[int, Sequence[int]] = 8,
        num_attention_heads: Optional[int] = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: Optional[str] = None,
        addition_embed_type: Optional[str] = None,
        addition_time_embed_dim: Optional[int] = None,
        num_class_embeds: Optional[int] = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        time_embedding_act_fn: Optional[str] = None,
        timestep_post_act: Optional[str] = None,
        time_cond_proj_dim: Optional[int] = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: Optional[int] = None,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: Optional[bool] = None,
        cross_attention_norm: Optional[str] = None,
        addition_embed_type_num_heads: int = 64,
        transfromer_in_opt: bool = False,
    ):
        super().__init__()
        levels = len(block_out_channels)
        # Options of the general diffusers UNet that no Show-1 checkpoint uses are refused rather
        # than silently ignored.
        _require(num_attention_heads is None, "num_attention_heads must be null (heads come from attention_head_dim)")
        _require(time_embedding_type == "positional", f"time_embedding_type {time_embedding_type!r}")
        _require(class_embed_type in (None, "timestep"), f"class_embed_type {class_embed_type!r}")
        _require(num_class_embeds is None and not class_embeddings_concat, "class embedding tables")
        _require(addition_embed_type in (None, "text"), f"addition_embed_type {addition_embed_type!r}")
        _require(encoder_hid_dim_type in (None, "text_proj"), f"encoder_hid_dim_type {encoder_hid_dim_type!r}")
        _require(time_cond_proj_dim is None and not dual_cross_attention, "time_cond_proj_dim / dual_cross_attention")
        _require(len(down_block_types) == levels == len(up_block_types), "block lists of different lengths")
        _require(norm_num_groups is not None, "norm_num_groups must be set")
        _require(mid_block_type is not None, "a mid block is required")

        layers_per_block = _per_level(layers_per_block, levels, "layers_per_block")
        head_dims = _per_level(attention_head_dim, levels, "attention_head_dim")
        cross_dims = _per_level(cross_attention_dim, levels, "cross_attention_dim")
        transformer_layers = _per_level(transformer_layers_per_block, levels, "transformer_layers_per_block")
        only_cross = _per_level(only_cross_attention, levels, "only_cross_attention")
        if mid_block_only_cross_attention is None:
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False

        # Time, class and text embeddings.
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn=act_fn, post_act_fn=timestep_post_act
        )
        self.class_embedding = None
        if class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        self.encoder_hid_proj = None
        if encoder_hid_dim is not None:
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_dims[0])
        self.add_embedding = None
        if addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(
                encoder_hid_dim or cross_dims[0], time_embed_dim, num_heads=addition_embed_type_num_heads
            )
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None

        self.conv_in = nn.Conv2d(
            in_channels, block_out_channels[0], kernel_size=conv_in_kernel, padding=(conv_in_kernel - 1) // 2
        )
        self.transformer_in = None
        if transfromer_in_opt:
            self.transformer_in = TransformerTemporalModel(
                num_attention_heads=8, attention_head_dim=64, in_channels=block_out_channels[0], num_layers=1
            )

        opts = BlockOptions(
            temb_channels=time_embed_dim,
            eps=norm_eps,
            act_fn=act_fn,
            groups=norm_num_groups,
            time_scale_shift=resnet_time_scale_shift,
            skip_time_act=resnet_skip_time_act,
            resnet_out_scale_factor=resnet_out_scale_factor,
            cross_attention_norm=cross_attention_norm,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            downsample_padding=downsample_padding,
        )

        def level(i):
            return LevelOptions(head_dims[i], cross_dims[i], transformer_layers[i], only_cross[i])

        self.down_blocks = nn.ModuleList()
        output_channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channels, output_channels = output_channels, block_out_channels[i]
            self.down_blocks.append(
                Show1DownBlock(
                    block_type, input_channels, output_channels, layers_per_block[i],
                    add_downsample=i < levels - 1, level=level(i), opts=opts,
                )
            )

        self.mid_block = Show1MidBlock(
            mid_block_type,
            block_out_channels[-1],
            mid_block_scale_factor,
            LevelOptions(head_dims[-1], cross_dims[-1], transformer_layers[-1], mid_block_only_cross_attention),
            opts,
        )

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channels = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            r = levels - 1 - i  # the matching down level
            prev_output_channels, output_channels = output_channels, reversed_channels[i]
            # The reference gives CrossAttn up blocks the reversed per-level head setting but
            # SimpleCrossAttn up blocks the unreversed one; identical for the published (scalar) configs.
            head_dim = head_dims[r] if block_type.startswith("CrossAttn") else head_dims[i]
            self.up_blocks.append(
                Show1UpBlock(
                    block_type,
                    in_channels=reversed_channels[min(i + 1, levels - 1)],
                    out_channels=output_channels,
                    prev_output_channels=prev_output_channels,
                    num_layers=layers_per_block[r] + 1,
                    add_upsample=i < levels - 1,
                    level=LevelOptions(head_dim, cross_dims[r], transformer_layers[r], only_cross[r]),
                    opts=opts,
                )
            )

        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, kernel_size=conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )
        # Heads of 5 to 20 channels would only run on the flash kernel (sm80+); padded, every fused
        # kernel takes them (show1.attention).
        use_padded_attention(self)

    def feed_forward_frame_by_frame(self):
        """Runs each temporal transformer's feed-forward one frame at a time (diffusers' feed-forward
        chunking along the frames): the same numbers to float rounding, from activations a frame's
        size instead of the video's. On a CPU, where those then stay in cache, sr2's UNet forward
        takes about two thirds of the time (docs/performance.md); not measured on a GPU."""
        for module in self.modules():
            if isinstance(module, TransformerTemporalModel):
                for block in module.transformer_blocks:
                    block.set_chunk_feed_forward(1, dim=1)  # [positions, frames, channels]: dim 1 is the frames

    def embed_conditions(self, timestep, class_labels, encoder_hidden_states, batch, dtype):
        """One embedding vector per video: time (+ class) (+ pooled raw text), [B, D]."""
        timesteps = torch.as_tensor(timestep, device=encoder_hidden_states.device)
        timesteps = timesteps.reshape(-1).expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("This UNet needs class_labels (the noise level of its condition)")
            class_labels = torch.as_tensor(class_labels, device=encoder_hidden_states.device).reshape(-1).expand(batch)
            emb = emb + self.class_embedding(self.time_proj(class_labels).to(dtype)).to(dtype)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, return_dict=True):
        """sample [B, C, F, H, W]; encoder_hidden_states [k*B, L, D], k rows of text per video, the
        rows of each kind together (the guidance batch: B unconditional, then B conditional);
        timestep and class_labels: one value, or one per row. Returns [k*B, C_out, F, H, W]."""
        videos, _, num_frames, height, width = sample.shape
        batch = encoder_hidden_states.shape[0]
        if batch % videos:
            raise ValueError(f"{batch} rows of text states for {videos} videos: expected a multiple")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed_conditions(timestep, class_labels, encoder_hidden_states, batch, sample.dtype)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        emb = emb.repeat_interleave(num_frames, dim=0)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        hidden_states = sample.permute(0, 2, 1, 3, 4).reshape(videos * num_frames, -1, height, width)
        hidden_states = self.conv_in(hidden_states)
        if self.transformer_in is not None:
            hidden_states = self.transformer_in(hidden_states, num_frames=num_frames).sample
        # Everything above is the same for every row of text of a video; from here on each has its own.
        hidden_states = hidden_states.repeat(batch // videos, 1, 1, 1)

        skips = (hidden_states,)
        for block in self.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb, encoder_hidden_states, num_frames)
            skips += block_skips

        hidden_states = self.mid_block(hidden_states, emb, encoder_hidden_states, num_frames)

        # Sizes that do not halve evenly need the upsamplers told the size to return to.
        upsample_factor = 2 ** (len(self.up_blocks) - 1)
        pass_sizes = height % upsample_factor != 0 or width % upsample_factor != 0
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if pass_sizes and i < len(self.up_blocks) - 1 else None
            hidden_states = block(hidden_states, block_skips, emb, encoder_hidden_states, num_frames, upsample_size)

        hidden_states = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))
        hidden_states = hidden_states.reshape(batch, num_frames, *hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (hidden_states,)
        return UNet3DConditionOutput(sample=hidden_states)
