"""Stage 3a: the first frame at 256x160 by DeepFloyd IF-II-L image super-resolution.

Its output anchors the video super-resolution: window 0 starts from this frame.
"""

import torch

from ..sampling import guided_denoise, image_unet_denoiser, randn, seeded_generator
from .superres_condition import noised_upscale

UPSCALE = 4


def upscale_first_frame(
    unet, scheduler, noising_scheduler, text, frame, *, steps, guidance, noise_level, seed, progress=iter
) -> torch.Tensor:
    """frame [1, 3, 1, 40, 64] -> float32 [1, 3, 1, 160, 256]."""
    device = unet.device
    frame = frame.to(device=device, dtype=torch.float32)
    height, width = frame.shape[3] * UPSCALE, frame.shape[4] * UPSCALE
    generator = seeded_generator(seed)
    scheduler.set_timesteps(steps)
    sample = randn((1, unet.config.in_channels // 2, 1, height, width), generator, device, torch.float32)
    sample = sample * scheduler.init_noise_sigma
    condition = noised_upscale(frame, height, width, noise_level, noising_scheduler, generator)
    levels = torch.full((2,), noise_level, device=device, dtype=torch.long)
    denoiser = image_unet_denoiser(unet, text.guidance_batch(1), class_labels=levels)
    return guided_denoise(
        denoiser, scheduler, sample, scheduler.timesteps, guidance, condition, generator=generator, progress=progress
    )
