"""Stage 1: 8 keyframes at 64x40 from noise, conditioned on the text alone."""

import torch

from ..sampling import guided_denoise, randn, seeded_generator, unet_denoiser

NUM_KEYFRAMES, HEIGHT, WIDTH = 8, 40, 64


def generate_keyframes(unet, scheduler, text, *, steps, guidance, seed, progress=iter) -> torch.Tensor:
    """-> float32 [1, 3, 8, 40, 64] in about [-1, 1]."""
    generator = seeded_generator(seed)
    scheduler.set_timesteps(steps)
    shape = (1, unet.config.out_channels // 2, NUM_KEYFRAMES, HEIGHT, WIDTH)
    sample = randn(shape, generator, unet.device, torch.float32) * scheduler.init_noise_sigma
    denoiser = unet_denoiser(unet, text.guidance_batch(1))
    return guided_denoise(denoiser, scheduler, sample, scheduler.timesteps, guidance, generator=generator, progress=progress)
