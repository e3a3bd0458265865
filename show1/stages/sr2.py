"""Stage `sr2`: video super-resolution 2, 256x160 -> 576x320 in the latent space of a VAE.

The frames are resized to the target size, encoded, noised part of the way (`strength`) and
denoised by the sr2 UNet with CLIP text guidance, then decoded. This is the video-to-video
("expert translation") step of zeroscope, which the sr2 UNet was fine-tuned from.
"""

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..frames import from_uint8_frames, resize_frames, to_uint8_frames
from ..sampling import batch_to_frames, frames_to_batch, guided_denoise, randn, seeded_generator

HEIGHT, WIDTH = 320, 576


def partial_timesteps(scheduler, steps, strength):
    """The last `strength` of a `steps`-step schedule, as image-to-image sampling uses it."""
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]


@torch.no_grad()
def encode_frames(vae, video, generator, frames_per_slice=1):
    """[1, 3, F, H, W] -> scaled latents [1, 4, F, H/8, W/8]: a posterior sample, drawn at once
    for all frames (one draw, as the reference), encoded a few frames at a time to bound memory."""
    images = frames_to_batch(video)
    moments = torch.cat([vae.encode(s).latent_dist.parameters for s in images.split(frames_per_slice)])
    latents = DiagonalGaussianDistribution(moments).sample(generator)
    return batch_to_frames(latents * vae.config.scaling_factor, video.shape[2])


@torch.no_grad()
def decode_latents(vae, latents, frames_per_slice=1):
    """[1, 4, F, h, w] -> [1, 3, F, 8h, 8w] float32."""
    latents = frames_to_batch(latents / vae.config.scaling_factor)
    images = torch.cat([vae.decode(s).sample for s in latents.split(frames_per_slice)])
    return batch_to_frames(images.float(), latents.shape[0])


def initial_latents(vae, scheduler, pixels, timesteps, generator):
    """Frames [1, 3, F, H, W] in [-1, 1] -> their float32 latents noised to the first kept timestep."""
    latents = encode_frames(vae, pixels.to(vae.dtype), generator).float()
    flat = frames_to_batch(latents)
    noise = randn(flat.shape, generator, flat.device)
    noised = scheduler.add_noise(flat, noise, timesteps[:1].repeat(flat.shape[0]))
    return batch_to_frames(noised, latents.shape[2])


def run(parts, text, video, *, steps, strength, guidance, seed, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, vae, scheduler); text: the CLIP states.
    video [1, 3, F, 160, 256] -> [1, 3, F, 320, 576] float32 in about [-1, 1]."""
    unet, vae, scheduler = parts.unet, parts.vae, parts.scheduler
    frames = resize_frames(to_uint8_frames(video), WIDTH, HEIGHT)
    generator = seeded_generator(seed)
    timesteps = partial_timesteps(scheduler, steps, strength)
    latents = initial_latents(vae, scheduler, from_uint8_frames(frames).to(unet.device), timesteps, generator)
    latents = guided_denoise(unet, scheduler, latents, timesteps, guidance, text, generator=generator, progress=progress)
    return decode_latents(vae, latents.to(vae.dtype))
