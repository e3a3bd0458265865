"""The cascade's stages, in the order they run."""

from .first_frame import upscale_first_frame
from .interpolation import interpolate_keyframes
from .keyframes import generate_keyframes
from .latent_superres import refine_video
from .video_superres import upscale_video

__all__ = ["generate_keyframes", "interpolate_keyframes", "upscale_first_frame", "upscale_video", "refine_video"]
