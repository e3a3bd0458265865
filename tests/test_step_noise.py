"""Noise drawn before the denoising loop (show1.step_noise) gives what diffusers' own DDPM step gives.

first_frame's DDPM steps take their noise from a tensor drawn ahead and copied to the device once,
instead of letting `DDPMScheduler.step` draw it from the CPU generator (and copy it) every step.
Drawn from the same generator in the same order, and stepped through `ddpm_step`, the samples
must be the very numbers diffusers' step computes, step after step, and the generator must end in
the same state for whatever draws from it next.
"""

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from conftest import REFERENCE_WEIGHTS
from show1.step_noise import ddpm_step, noise_ahead

CPU = torch.device("cpu")
STEPS = 6
# Two frames as the loop flattens them: [frames, channels, height, width]. 210 numbers a draw, not a
# multiple of 16, so that one draw for all steps would give other numbers than a draw per step.
SHAPE = (2, 3, 5, 7)


def if_scheduler(**changes):
    """IF-II's scheduler as published (learned_range variance, dynamic thresholding), with changes."""
    config = DDPMScheduler.load_config(REFERENCE_WEIGHTS / "IF-II-L-v1.0", subfolder="scheduler")
    scheduler = DDPMScheduler.from_config({**config, **changes})
    scheduler.set_timesteps(STEPS)
    return scheduler


def network_outputs(variance_type):
    """A fixed sequence of network outputs: the predicted noise, then, for a learned variance, the
    predicted variance channels: in [-1, 1] for IF-II's learned_range (where the variance lies between
    DDPM's two bounds), a positive variance for "learned"."""
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(STEPS):
        noise = torch.randn(SHAPE, generator=generator)
        fraction = torch.rand(SHAPE, generator=generator)
        variance = {"learned_range": fraction * 2 - 1, "learned": fraction * 1e-2}.get(variance_type)
        outputs.append(noise if variance is None else torch.cat([noise, variance], dim=1))
    return outputs


CONFIGURATIONS = {
    "IF-II (learned_range, thresholding)": {},
    "learned": {"variance_type": "learned"},
    "fixed_small, clipping": {"variance_type": "fixed_small", "thresholding": False},
    "fixed_small_log": {"variance_type": "fixed_small_log"},
    "fixed_large, no clipping": {"variance_type": "fixed_large", "thresholding": False, "clip_sample": False},
}


@pytest.mark.parametrize("changes", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_noise_drawn_ahead_steps_exactly_like_diffusers(changes):
    ours, theirs = if_scheduler(**changes), if_scheduler(**changes)
    outputs = network_outputs(ours.config.variance_type)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    our_generator, their_generator = torch.Generator().manual_seed(345), torch.Generator().manual_seed(345)

    step_noise = noise_ahead(ours, ours.timesteps, SHAPE, our_generator, CPU)
    assert [noise is None for noise in step_noise] == [False] * (STEPS - 1) + [True]  # none at t = 0

    our_sample, their_sample = start, start
    for i, t in enumerate(theirs.timesteps):
        their_sample = theirs.step(outputs[i], t, their_sample, generator=their_generator).prev_sample
        our_sample = ddpm_step(ours, outputs[i], t, our_sample, step_noise[i])
        assert torch.equal(our_sample, their_sample), f"step {i} (t={int(t)})"
    assert torch.equal(our_generator.get_state(), their_generator.get_state())


def test_schedulers_that_draw_nothing_get_no_noise_and_leave_the_generator_alone():
    """The DPM-Solver++ of the other stages is deterministic: it keeps its own step, unchanged."""
    scheduler = DPMSolverMultistepScheduler.from_pretrained(REFERENCE_WEIGHTS / "show-1-sr1", subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(345)
    state = generator.get_state()
    assert noise_ahead(scheduler, scheduler.timesteps, SHAPE, generator, CPU) == [None] * STEPS
    assert torch.equal(generator.get_state(), state)


def test_a_ddpm_step_without_its_noise_is_refused():
    scheduler = if_scheduler()
    output, sample = network_outputs(scheduler.config.variance_type)[0], torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="needs its noise"):
        ddpm_step(scheduler, output, scheduler.timesteps[0], sample, None)
    ddpm_step(scheduler, output, scheduler.timesteps[-1], sample, None)  # t = 0: the mean alone
