"""Every user-facing setting of the cascade, with the reference defaults and sane ranges.

This is the one place the defaults live: the pipeline and the benchmark read them. predict.py
writes its Cog inputs as literals (`cog build` reads them without running any code), and
tests/test_predictor.py checks that they match these. The numbers are those of the reference driver.
"""

from dataclasses import dataclass, make_dataclass
from typing import Optional


@dataclass(frozen=True)
class Setting:
    """A setting's reference default and, for numbers, its inclusive range (named as Cog's Input
    names them)."""

    default: object
    ge: Optional[float] = None
    le: Optional[float] = None


# Every setting, declared once; Show1Settings has one field per entry, in this order.
SETTINGS = {
    "negative_prompt": Setting("low resolution, blur"),  # what sr2's guidance steers away from
    "seed": Setting(0),  # any integer in [0, 2**63)
    "keyframe_steps": Setting(75, 1, 500),
    "keyframe_guidance": Setting(9.0, 1.0, 30.0),
    "interpolation_steps": Setting(75, 1, 500),
    "interpolation_guidance": Setting(4.0, 1.0, 30.0),
    "first_frame_steps": Setting(70, 1, 500),
    "first_frame_guidance": Setting(4.0, 1.0, 30.0),
    "first_frame_noise_level": Setting(150, 0, 999),
    "sr1_steps": Setting(125, 1, 500),
    "sr1_guidance": Setting(7.0, 1.0, 30.0),
    "sr1_noise_level": Setting(250, 0, 999),
    "sr2_steps": Setting(50, 1, 500),
    "sr2_strength": Setting(0.8, 0.0, 1.0),
    "sr2_guidance": Setting(15.0, 1.0, 30.0),
    "output_stage": Setting("full"),  # a key of OUTPUT_STAGES
}

# How far the cascade runs, as the published API (predict.py's output_stage) names it -> the last
# stage that runs (show1.components.STAGES). Each later stage includes the earlier ones.
OUTPUT_STAGES = {"keyframes": "keyframes", "interpolated": "interpolation", "sr1": "sr1", "full": "sr2"}

# The fields of Show1Settings: one per setting, typed and defaulted by its reference default.
SettingFields = make_dataclass(
    "SettingFields",
    [(name, type(setting.default), setting.default) for name, setting in SETTINGS.items()],
    frozen=True,
)


@dataclass(frozen=True)
class Show1Settings(SettingFields):
    """The settings of one generation (SETTINGS), checked when made; the defaults are the reference's."""

    def __post_init__(self):
        for name, setting in SETTINGS.items():
            value = getattr(self, name)
            if setting.ge is not None and not (setting.ge <= value <= setting.le):
                raise ValueError(f"{name}={value!r} is out of range [{setting.ge}, {setting.le}]")
        if not isinstance(self.seed, int) or not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.output_stage not in OUTPUT_STAGES:
            raise ValueError(f"output_stage must be one of {tuple(OUTPUT_STAGES)}, got {self.output_stage!r}")
        if int(self.sr2_steps * self.sr2_strength) < 1 and self.last_stage == "sr2":
            raise ValueError("sr2_steps * sr2_strength must give at least one denoising step")

    @property
    def last_stage(self) -> str:
        """The id of the last stage that runs."""
        return OUTPUT_STAGES[self.output_stage]
