"""Predicted peak GPU memory of every stage at the published sizes, on a machine without a GPU.

Every network is built at its published size on the meta device, cast to its serving dtype
(float16; T5's `wo` layers float32, as transformers loads it) and moved onto fake tensors
(torch's FakeTensorMode): each forward the stage makes runs once, at the shapes the stage code
uses, and every operator's output has its real size and dtype but no memory behind it. A dispatch
mode counts the bytes of the storages those operators create while they are alive, and keeps the
peak: that is the activation memory of the call. Nothing is downloaded and nothing is allocated.

Two things differ from a GPU run and are handled here:
- On the CPU, scaled_dot_product_attention falls back to the math kernel, which materialises the
  attention matrix (over 200 GiB for one sr2 forward). The pipeline only allows the fused kernels
  on a GPU, so attention is replaced by a stand-in that allocates what the flash kernel allocates:
  the output and its float32 log-sum-exp. The UNets' attention processors pad heads to a multiple
  of 8 before the call (show1.attention); those padded q/k/v copies are ordinary operator outputs,
  counted like any other. A call whose head is still not a multiple of 8 would run on the flash
  kernel alone (sm80+), which pads internally: the stand-in allocates those padded copies too and
  counts such calls (`attention_calls_needing_flash`, 0 when every network pads).
- The CUDA caching allocator rounds blocks up and keeps freed blocks for reuse, and cuBLAS/cuDNN
  take workspaces; none of this is counted, so a GPU's max_memory_allocated will be somewhat higher.
"""

import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from show1.attention import padded_width
from show1.components import STAGES
from show1.plans import LOW_MEMORY_GOAL_GIB, prefetch_fits
from show1.stages.interpolation import SEGMENT_FRAMES
from show1.stages.keyframes import HEIGHT, NUM_KEYFRAMES, WIDTH
from show1.stages.sr1 import UPSCALE, WINDOW
from show1.stages.sr2 import HEIGHT as SR2_HEIGHT
from show1.stages.sr2 import WIDTH as SR2_WIDTH
from show1.stages.text import MAX_TOKENS

from .cascade import stage_weight_bytes
from .random_weights import random_components

GIB = 2**30
SERVING_DTYPE = torch.float16
GUIDANCE_BATCH = 2  # classifier-free guidance runs [unconditional, conditional] in one batch
SEGMENTS = NUM_KEYFRAMES - 1
VIDEO_FRAMES = (SEGMENT_FRAMES - 1) * SEGMENTS + 1  # 29: neighbouring segments share a keyframe


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the storages created by operators while this mode is active and still alive, and
    their peak. Storages that existed before (weights, inputs) and views of them are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage, inputs):
        key = storage._cdata
        if key in inputs or key in self._counted:
            return
        self._counted.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        # The storage's Python object lives exactly as long as the storage itself.
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self._counted.discard(key)
        self.live -= nbytes


class FlashAttentionStandIn(TorchFunctionMode):
    """Replaces scaled_dot_product_attention by the allocations of the flash kernel, and counts
    the calls that only the flash kernel would take (heads not a multiple of 8)."""

    def __init__(self):
        super().__init__()
        self.calls_needing_flash = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        query, key, value = args[:3]
        head, padded = query.shape[-1], padded_width(query.shape[-1])
        padded_copies = []
        if padded != head:
            self.calls_needing_flash += 1
            # Flash's own padded copies, held until the output exists, as inside the kernel.
            padded_copies = [t.new_empty((*t.shape[:-1], padded)) for t in (query, key, value)]
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        del padded_copies, log_sum_exp
        return out


def published_networks_on_meta():
    """Every network at its published size, on the meta device, in its serving dtype
    (show1.components.Components of the networks alone)."""
    return random_components("published", "meta", SERVING_DTYPE, networks_only=True)


# The forward calls each stage makes, at the shapes of the stage code (show1/stages), with the
# interpolation segments in one batch as this project runs them. Each takes the fake networks and
# returns a list of calls; a call returns the tensors it produces.


def _text_width(text_encoder):
    config = text_encoder.config
    return getattr(config, "d_model", None) or config.hidden_size


def _t5_states(networks, batch):
    return torch.empty(batch, MAX_TOKENS, _text_width(networks.text.t5), dtype=SERVING_DTYPE)


def _timestep():
    return torch.tensor(999)


def _noise_levels(batch, level):
    return torch.full((batch,), level, dtype=torch.long)


def _video_unet_call(unet, videos, frames, height, width, text_states, class_labels=None):
    """The Show-1 UNet as guidance calls it (show1.sampling.predict_noise): each of the `videos`
    once, with GUIDANCE_BATCH rows of text states per video."""
    sample = torch.empty(videos, unet.config.in_channels, frames, height, width, dtype=SERVING_DTYPE)
    return lambda: unet(sample, _timestep(), encoder_hidden_states=text_states, class_labels=class_labels).sample


def text_calls(networks):
    ids = torch.ones(1, MAX_TOKENS, dtype=torch.long)
    t5, clip = networks.text.t5, networks.text.clip
    return [lambda: t5(ids, attention_mask=torch.ones_like(ids)).last_hidden_state, lambda: clip(ids)[0]]


def keyframes_calls(networks):
    return [_video_unet_call(networks.keyframes.unet, 1, NUM_KEYFRAMES, HEIGHT, WIDTH,
                             _t5_states(networks, GUIDANCE_BATCH))]


def interpolation_calls(networks, segments_per_batch=SEGMENTS):
    return [_video_unet_call(networks.interpolation.unet, segments_per_batch, SEGMENT_FRAMES, HEIGHT, WIDTH,
                             _t5_states(networks, GUIDANCE_BATCH * segments_per_batch))]


def first_frame_calls(networks):
    unet = networks.first_frame.unet
    sample = torch.empty(GUIDANCE_BATCH, unet.config.in_channels, HEIGHT * UPSCALE, WIDTH * UPSCALE, dtype=SERVING_DTYPE)
    states, levels = _t5_states(networks, GUIDANCE_BATCH), _noise_levels(GUIDANCE_BATCH, 150)
    return [lambda: unet(sample, _timestep(), encoder_hidden_states=states, class_labels=levels).sample]


def sr1_calls(networks):
    return [_video_unet_call(networks.sr1.unet, 1, WINDOW, HEIGHT * UPSCALE, WIDTH * UPSCALE,
                             _t5_states(networks, GUIDANCE_BATCH), _noise_levels(GUIDANCE_BATCH, 250))]


def sr2_calls(networks):
    """The UNet on all 29 frames' latents; the VAE one frame at a time (as the stage encodes and
    decodes)."""
    vae = networks.sr2.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_height, latent_width = SR2_HEIGHT // scale, SR2_WIDTH // scale
    clip_states = torch.empty(GUIDANCE_BATCH, MAX_TOKENS, _text_width(networks.text.clip), dtype=SERVING_DTYPE)
    frame = torch.empty(1, vae.config.in_channels, SR2_HEIGHT, SR2_WIDTH, dtype=SERVING_DTYPE)
    latent = torch.empty(1, vae.config.latent_channels, latent_height, latent_width, dtype=SERVING_DTYPE)
    return [
        lambda: vae.encode(frame).latent_dist.parameters,
        _video_unet_call(networks.sr2.unet, 1, VIDEO_FRAMES, latent_height, latent_width, clip_states),
        lambda: vae.decode(latent).sample,
    ]


STAGE_CALLS = {
    "text": text_calls,
    "keyframes": keyframes_calls,
    "interpolation": interpolation_calls,
    "first_frame": first_frame_calls,
    "sr1": sr1_calls,
    "sr2": sr2_calls,
}


@dataclass
class StagePrediction:
    stage: str
    weight_bytes: int
    activation_peak_bytes: int  # the largest peak of one of the stage's forward calls
    attention_calls_needing_flash: int = 0  # attention calls whose heads are not a multiple of 8

    @property
    def peak_bytes(self):
        """The stage alone on the device (the low-memory plan)."""
        return self.weight_bytes + self.activation_peak_bytes


def activation_peak_bytes(call) -> int:
    """Peak bytes allocated by one fake forward call above what existed before it."""
    counter = LiveStorageBytes()
    with counter:
        outputs = call()
        del outputs
    return counter.peak


def predict_stage(stage, networks, weight_bytes) -> StagePrediction:
    """Runs the stage's forward calls once, its networks moved onto fake tensors (the others are
    only read for their configs)."""
    attention = FlashAttentionStandIn()
    with FakeTensorMode(allow_non_fake_inputs=True), attention, torch.no_grad():
        for network in networks.networks(stage):
            network.to_empty(device="cpu")
        peak = max(activation_peak_bytes(call) for call in STAGE_CALLS[stage](networks))
    return StagePrediction(stage, weight_bytes[stage], peak, attention.calls_needing_flash)


@dataclass
class PlanPrediction:
    """Both plans' peaks, from the stages' predictions. The low-memory plan has one stage's
    networks on the device at a time, plus the next stage's where show1.plans.prefetch_fits lets it
    upload them while the stage computes (show1.offload)."""

    stages: dict  # {stage: StagePrediction}
    all_weight_bytes: int
    stage_weight_bytes: dict = field(default_factory=dict)  # {stage: bytes} of every stage, predicted or not

    @property
    def resident_bytes(self):
        """Every network on the device, plus the largest activation peak of any stage."""
        return self.all_weight_bytes + max(p.activation_peak_bytes for p in self.stages.values())

    def prefetched(self, stage):
        """The stage whose networks the low-memory plan uploads while `stage` computes in a default
        video (all six stages), or None."""
        following = STAGES[STAGES.index(stage) + 1:]
        return following[0] if following and prefetch_fits(stage, following[0]) else None

    def low_memory_stage_bytes(self, stage):
        """The device memory during `stage` under the low-memory plan: the stage alone, plus the
        next stage's weights when they are prefetched meanwhile."""
        prefetched = self.prefetched(stage)
        return self.stages[stage].peak_bytes + (self.stage_weight_bytes[prefetched] if prefetched else 0)

    @property
    def low_memory_bytes(self):
        """The low-memory plan's peak: its largest stage, with what it prefetches."""
        return max(self.low_memory_stage_bytes(stage) for stage in self.stages)

    @property
    def attention_calls_needing_flash(self):
        return sum(p.attention_calls_needing_flash for p in self.stages.values())

    @property
    def largest_stage(self):
        """The stage of the low-memory plan's peak."""
        return max(self.stages, key=self.low_memory_stage_bytes)


def predict(stages=tuple(STAGE_CALLS), out=print) -> PlanPrediction:
    """Predicted peaks of `stages` (default all) and of both plans; prints one line per stage."""
    networks = published_networks_on_meta()
    weight_bytes = stage_weight_bytes(networks)
    predictions = {}
    for stage in stages:
        predictions[stage] = predict_stage(stage, networks, weight_bytes)
        out(format_stage(predictions[stage]))
    return PlanPrediction(predictions, sum(weight_bytes.values()), weight_bytes)


def gib(nbytes) -> str:
    return f"{nbytes / GIB:.2f}"


def format_stage(p: StagePrediction) -> str:
    return (f"  {p.stage:<14}weights {gib(p.weight_bytes):>6} GiB   activations {gib(p.activation_peak_bytes):>6} GiB"
            f"   alone on the GPU {gib(p.peak_bytes):>6} GiB")


def format_low_memory_stage(prediction: PlanPrediction, stage) -> str:
    """How much the low-memory plan holds during `stage`, and whether it prefetches the next one."""
    alone, prefetched = prediction.stages[stage].peak_bytes, prediction.prefetched(stage)
    following = STAGES[STAGES.index(stage) + 1:]
    if prefetched:
        upload = f"+ the weights of {prefetched}, {gib(prediction.stage_weight_bytes[prefetched])} GiB, prefetched"
    elif following:
        would_be = alone + prediction.stage_weight_bytes[following[0]]
        upload = f"(prefetching the weights of {following[0]} would need {gib(would_be)} GiB)"
    else:
        upload = "(the last stage)"
    return f"  {stage:<14}alone {gib(alone):>6} GiB {upload}: {gib(prediction.low_memory_stage_bytes(stage))} GiB"


def format_prediction(prediction: PlanPrediction) -> list:
    """The plan lines; the last one is `predicted_peak_gib resident=X low_memory=Y`."""
    stages = ", ".join(prediction.stages)
    return [
        f"resident plan: all weights {gib(prediction.all_weight_bytes)} GiB + the largest activation peak "
        f"(of {stages}) = {gib(prediction.resident_bytes)} GiB",
        f"low-memory plan: one stage's networks at a time, and the next stage's while it computes where that "
        f"stays within {LOW_MEMORY_GOAL_GIB} GiB:",
        *[format_low_memory_stage(prediction, stage) for stage in prediction.stages],
        f"low-memory plan: the largest is {prediction.largest_stage} = {gib(prediction.low_memory_bytes)} GiB",
        f"predicted_peak_gib resident={gib(prediction.resident_bytes)} low_memory={gib(prediction.low_memory_bytes)}",
    ]

