"""The condition of the pixel super-resolution stages (first_frame, sr1): the low-resolution
frames, upscaled bilinearly and noised to a given level, so the network learns to fix upscaling
artefacts."""

import torch
import torch.nn.functional as F

from ..sampling import batch_to_frames, frames_to_batch, randn


def noised_upscale(video, height, width, noise_level, noising_scheduler, generator):
    """float32 [B, C, F, h, w] -> [B, C, F, height, width] upscaled and noised at `noise_level`."""
    upscaled = F.interpolate(frames_to_batch(video), (height, width), mode="bilinear", align_corners=True)
    upscaled = batch_to_frames(upscaled, video.shape[2])
    noise = randn(upscaled.shape, generator, upscaled.device)
    levels = torch.full((upscaled.shape[0],), noise_level, device=upscaled.device, dtype=torch.long)
    return noising_scheduler.add_noise(upscaled, noise, levels)
