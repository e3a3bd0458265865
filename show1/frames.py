"""Conversions between float video tensors in [-1, 1] and uint8 frames."""

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]; values are truncated, as the reference does."""
    video = video.detach().float()[0].permute(1, 2, 3, 0)
    video = (video * 0.5 + 0.5).clamp(0, 1)
    return (video * 255).to(torch.uint8).cpu().numpy()


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, F, H, W] in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
    return (2.0 * video - 1.0).permute(3, 0, 1, 2)[None]


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resizes each uint8 frame with PIL's bicubic filter (the reference's choice)."""
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
