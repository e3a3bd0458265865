"""Stage 3b: video super-resolution 1, 29 frames 64x40 -> 256x160 in pixel space.

The video is processed in windows of 8 frames with a 1-frame overlap (starts 0, 7, 14, 21). The
first frame of each window's condition is replaced by an already super-resolved frame (the
first-frame stage's output for window 0, the previous window's last frame after that), so the
windows chain into one consistent video and run one after another.
"""

import torch

from ..sampling import guided_denoise, randn, seeded_generator, unet_denoiser
from .superres_condition import noised_upscale

UPSCALE, WINDOW, STRIDE = 4, 8, 7


def window_starts(num_frames):
    return list(range(0, num_frames - WINDOW + 1, STRIDE))


def upscale_video(
    unet, scheduler, noising_scheduler, text, video, first_frame, *, steps, guidance, noise_level, seed, progress=iter
) -> torch.Tensor:
    """video [1, 3, 29, 40, 64], first_frame [1, 3, 1, 160, 256] -> float32 [1, 3, 29, 160, 256]."""
    device = unet.device
    video = video.to(device=device, dtype=torch.float32)
    batch, channels, num_frames, h, w = video.shape
    height, width = h * UPSCALE, w * UPSCALE
    output = video.new_zeros((batch, channels, num_frames, height, width))
    anchor = first_frame.to(device=device, dtype=torch.float32)
    levels = torch.full((2,), noise_level, device=device, dtype=torch.long)
    denoiser = unet_denoiser(unet, text.guidance_batch(1), class_labels=levels)
    for start in window_starts(num_frames):
        if start > 0:
            anchor = output[:, :, start : start + 1]
        generator = seeded_generator(seed)
        scheduler.set_timesteps(steps)
        sample = randn((batch, channels, WINDOW, height, width), generator, device, torch.float32) * scheduler.init_noise_sigma
        window = video[:, :, start : start + WINDOW]
        condition = noised_upscale(window, height, width, noise_level, noising_scheduler, generator)
        condition[:, :, :1] = anchor
        output[:, :, start : start + WINDOW] = guided_denoise(
            denoiser, scheduler, sample, scheduler.timesteps, guidance, condition, generator, progress
        )
    return output
