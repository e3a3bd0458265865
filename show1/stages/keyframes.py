"""Stage `keyframes`: 8 keyframes at 64x40 from noise, conditioned on the text alone."""

import torch

from ..sampling import guided_denoise, initial_noise

NUM_KEYFRAMES, HEIGHT, WIDTH = 8, 40, 64


def run(parts, text, *, steps, guidance, seed, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, scheduler). -> float32 [1, 3, 8, 40, 64] in about [-1, 1]."""
    unet, scheduler = parts.unet, parts.scheduler
    shape = (1, unet.config.out_channels // 2, NUM_KEYFRAMES, HEIGHT, WIDTH)
    sample, generator = initial_noise(scheduler, steps, shape, seed, unet.device)
    return guided_denoise(
        unet, scheduler, sample, scheduler.timesteps, guidance, text, generator=generator, progress=progress
    )
