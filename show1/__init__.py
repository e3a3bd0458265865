"""Show-1 text-to-video: the engine behind the Cog container."""

from .pipeline import Show1Output, Show1Pipeline
from .settings import Show1Settings

__all__ = ["Show1Pipeline", "Show1Output", "Show1Settings"]
