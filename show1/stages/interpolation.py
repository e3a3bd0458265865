"""Stage `interpolation`: 8 keyframes -> 29 frames, three new frames between each pair of keyframes.

Each of the 7 segments denoises 5 frames whose ends are two neighbouring keyframes. The condition
is the linear blend of the two keyframes over the 5 frames plus a mask marking the ends. All
segments start from the same noise and depend only on the keyframes, so they run as one batch.
"""

import torch
import torch.nn.functional as F

from ..sampling import guided_denoise, initial_noise

SEGMENT_FRAMES = 5  # keyframe, 3 new frames, keyframe


def segment_conditions(keyframes):
    """[1, 3, K, H, W] -> [K-1, 4, 5, H, W]: blend of each keyframe pair ++ endpoint mask."""
    pairs = torch.stack([keyframes[0, :, :-1], keyframes[0, :, 1:]], dim=2).transpose(0, 1)  # [K-1, 3, 2, H, W]
    *_, height, width = keyframes.shape
    blend = F.interpolate(pairs, (SEGMENT_FRAMES, height, width), mode="trilinear", align_corners=True)
    mask = torch.zeros_like(blend[:, :1])
    mask[:, :, [0, -1]] = 1
    return torch.cat([blend, mask], dim=1)


def place_segments(segments):
    """[K-1, 3, 5, H, W] -> [1, 3, 4(K-1)+1, H, W]; a later segment overwrites the frame it shares."""
    count = segments.shape[0]
    video = segments.new_zeros((1, segments.shape[1], 4 * count + 1, *segments.shape[3:]))
    for i in range(count):
        video[0, :, 4 * i : 4 * i + SEGMENT_FRAMES] = segments[i]
    return video


def run(parts, text, keyframes, *, steps, guidance, seed, segments_per_batch=None, progress=iter) -> torch.Tensor:
    """parts: the stage's components (unet, scheduler). keyframes [1, 3, 8, 40, 64] -> float32
    [1, 3, 29, 40, 64]. The segments are denoised `segments_per_batch` at a time (default: all at
    once); the result does not depend on it."""
    unet, scheduler = parts.unet, parts.scheduler
    keyframes = keyframes.to(device=unet.device, dtype=torch.float32)
    conditions = segment_conditions(keyframes)
    noise_shape = (1, keyframes.shape[1], SEGMENT_FRAMES, *keyframes.shape[3:])
    noise, _ = initial_noise(scheduler, steps, noise_shape, seed, unet.device)

    def denoise(condition):
        count = condition.shape[0]
        scheduler.set_timesteps(steps)  # every batch walks the whole schedule from its start
        sample = noise.expand(count, -1, -1, -1, -1).contiguous()
        return guided_denoise(
            unet, scheduler, sample, scheduler.timesteps, guidance, text, condition=condition, progress=progress
        )

    batches = conditions.split(segments_per_batch or conditions.shape[0])
    return place_segments(torch.cat([denoise(condition) for condition in batches]))
