"""Stage `sr1`: video super-resolution 1, 29 frames 64x40 -> 256x160 in pixel space.

The video is processed in windows of 8 frames with a 1-frame overlap (starts 0, 7, 14, 21). The
first frame of each window's condition is replaced by an already super-resolved frame (the
first_frame stage's output for window 0, the previous window's last frame after that), so the
windows chain into one consistent video and run one after another.
"""

import torch

from ..sampling import guided_denoise, initial_noise
from .superres_condition import noised_upscale

UPSCALE, WINDOW, STRIDE = 4, 8, 7


def window_starts(num_frames):
    return list(range(0, num_frames - WINDOW + 1, STRIDE))


def run(parts, text, video, first_frame, *, steps, guidance, noise_level, seed, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, scheduler, noising_scheduler).
    video [1, 3, 29, 40, 64], first_frame [1, 3, 1, 160, 256] -> float32 [1, 3, 29, 160, 256]."""
    unet, scheduler = parts.unet, parts.scheduler
    device = unet.device
    video = video.to(device=device, dtype=torch.float32)
    batch, channels, num_frames, h, w = video.shape
    height, width = h * UPSCALE, w * UPSCALE
    output = video.new_zeros((batch, channels, num_frames, height, width))
    anchor = first_frame.to(device=device, dtype=torch.float32)
    for start in window_starts(num_frames):
        if start > 0:
            anchor = output[:, :, start : start + 1]
        sample, generator = initial_noise(scheduler, steps, (batch, channels, WINDOW, height, width), seed, device)
        window = video[:, :, start : start + WINDOW]
        condition = noised_upscale(window, height, width, noise_level, parts.noising_scheduler, generator)
        condition[:, :, :1] = anchor
        output[:, :, start : start + WINDOW] = guided_denoise(
            unet, scheduler, sample, scheduler.timesteps, guidance, text, condition=condition, noise_level=noise_level,
            generator=generator, progress=progress,
        )
    return output
