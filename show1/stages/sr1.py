"""Stage `sr1`: video super-resolution 1, 29 frames 64x40 -> 256x160 in pixel space.

The video is processed in windows of 8 frames with a 1-frame overlap (starts 0, 7, 14, 21). The
first frame of each window's condition is replaced by an already super-resolved frame (the
first_frame stage's output for window 0, the previous window's last frame after that), so the
windows chain into one consistent video and run one after another.
"""

import torch

from ..sampling import guided_denoise, initial_noise, noised_upscale

UPSCALE, WINDOW, STRIDE = 4, 8, 7


def window_starts(num_frames):
    """Where each window starts: every STRIDE frames, so that consecutive windows share one frame and
    the last ends on the last frame. That tiles exactly 7k + 1 frames (k >= 1), 29 in the pipeline.
    Any other count is refused: the last frames would be left out, and a last window shifted back
    to the end would overlap by more than the one frame it is anchored on, and redo frames that
    already chained into the video."""
    if num_frames < WINDOW or (num_frames - 1) % STRIDE:
        raise ValueError(
            f"sr1 needs a frame count of {STRIDE}k + 1 ({WINDOW}, {WINDOW + STRIDE}, {WINDOW + 2 * STRIDE}, "
            f"{WINDOW + 3 * STRIDE}, ...) to cover the video with windows of {WINDOW} frames overlapping "
            f"by one; got {num_frames} frames"
        )
    return list(range(0, num_frames - 1, STRIDE))


def run(parts, text, video, first_frame, *, steps, guidance, noise_level, seed, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, scheduler, noising_scheduler).
    video [1, 3, 29, 40, 64], first_frame [1, 3, 1, 160, 256] -> float32 [1, 3, 29, 160, 256]."""
    unet, scheduler = parts.unet, parts.scheduler
    device = unet.device
    video = video.to(device=device, dtype=torch.float32)
    batch, channels, num_frames, h, w = video.shape
    starts = window_starts(num_frames)  # first, so that a frame count it cannot tile fails at once
    height, width = h * UPSCALE, w * UPSCALE
    output = video.new_zeros((batch, channels, num_frames, height, width))
    anchor = first_frame.to(device=device, dtype=torch.float32)
    for start in starts:
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
