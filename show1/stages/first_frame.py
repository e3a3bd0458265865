"""Stage `first_frame`: the first frame at 256x160 by DeepFloyd IF-II-L image super-resolution.

Its output anchors the video super-resolution: sr1's first window starts from this frame.
"""

import torch

from ..sampling import guided_denoise, initial_noise, noised_upscale

UPSCALE = 4


def run(parts, text, frame, *, steps, guidance, noise_level, seed, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, scheduler, noising_scheduler).
    frame [1, 3, 1, 40, 64] -> float32 [1, 3, 1, 160, 256]."""
    unet, scheduler = parts.unet, parts.scheduler
    frame = frame.to(device=unet.device, dtype=torch.float32)
    height, width = frame.shape[3] * UPSCALE, frame.shape[4] * UPSCALE
    shape = (1, unet.config.in_channels // 2, 1, height, width)
    sample, generator = initial_noise(scheduler, steps, shape, seed, unet.device)
    condition = noised_upscale(frame, height, width, noise_level, parts.noising_scheduler, generator)
    # The generator's remaining draws are the DDPM steps' noise, which guided_denoise draws before
    # its loop (show1.step_noise), in step order: the reference drew the same numbers step by step.
    return guided_denoise(
        unet, scheduler, sample, scheduler.timesteps, guidance, text, condition=condition, noise_level=noise_level,
        generator=generator, progress=progress,
    )
