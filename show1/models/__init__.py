from .unet3d import UNet3DConditionModel, UNet3DConditionOutput

__all__ = ["UNet3DConditionModel", "UNet3DConditionOutput"]
