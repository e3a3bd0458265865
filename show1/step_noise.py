"""Random noise for stochastic scheduler steps, drawn before the denoising loop.

A DDPM step (IF-II's scheduler, in the first_frame stage) adds fresh Gaussian noise at every step
but the last. diffusers draws it inside `step` from the generator it is given; with the stage's CPU
generator, which keeps the reference's random numbers on any device, that is a CPU draw and a
blocking host-to-device copy in every step: on a GPU, a full wait for the stream each time.

Instead, the loop draws the noise of all its steps up front, from the same generator in the same
order, and moves it to the device in one copy. Each step then takes its noise from there, through
`ddpm_step`, which computes what the scheduler's own `step` computes with the noise supplied
(diffusers' DDPM step has no argument for it). Schedulers whose steps draw nothing, such as the
DPM-Solver++ of the other stages, and configurations `ddpm_step` does not cover, keep stepping
through their own `step` with the generator, exactly as before.
"""

import torch
from diffusers import DDPMScheduler


def takes_noise_ahead(scheduler) -> bool:
    """Whether `ddpm_step` can step this scheduler with noise drawn ahead: a DDPM scheduler whose
    network predicts the noise (IF-II's configuration)."""
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == "epsilon"


def draws_noise(scheduler, t) -> bool:
    """Whether the step at timestep t adds fresh noise: a DDPM step does at every t > 0, and the
    last step (t = 0) returns the mean alone. `t` is a CPU timestep, so this costs no wait."""
    return takes_noise_ahead(scheduler) and bool(t > 0)


def to_device_without_waiting(host: torch.Tensor, device) -> torch.Tensor:
    """Copies `host` to `device`. From page-locked memory a CUDA copy is queued on the stream and the
    host runs on; from ordinary (pageable) memory it would wait for the copy to finish."""
    if device.type == "cuda" and torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def noise_ahead(scheduler, timesteps, shape, generator, device) -> list:
    """The noise each step of a loop over `timesteps` adds, one entry per step (None where the step
    adds none), drawn now and on the device.

    Each step's noise is drawn by its own `torch.randn(shape)` call from `generator`, in step
    order, as the scheduler's `step` would draw it: one draw for all steps can give other numbers
    (the CPU generator transforms its numbers in blocks of 16). The loop must not draw from
    `generator` itself, or later draws would shift: in guided_denoise its steps were its only use.
    """
    noisy_steps = [i for i, t in enumerate(timesteps) if draws_noise(scheduler, t)]
    step_noise = [None] * len(timesteps)
    if not noisy_steps:
        return step_noise
    drawn = torch.stack([torch.randn(shape, generator=generator, dtype=torch.float32) for _ in noisy_steps])
    for i, noise in zip(noisy_steps, to_device_without_waiting(drawn, device)):
        step_noise[i] = noise
    return step_noise


def predicted_x0(scheduler, noise_pred, t, sample):
    """The clean image implied by the predicted noise, x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
    then limited as the scheduler is configured (dynamic thresholding for IF-II, else clipping)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    x0 = (sample - (1 - alpha_bar) ** 0.5 * noise_pred) / alpha_bar**0.5
    if scheduler.config.thresholding:
        return scheduler._threshold_sample(x0)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        return x0.clamp(-limit, limit)
    return x0


def posterior_mean(scheduler, x0, t, sample):
    """The mean of x_{t-1} given x_t and x0 (Ho et al. 2020, eq. 7), from the scheduler's tables."""
    alpha_bar = scheduler.alphas_cumprod[t]
    prev_t = scheduler.previous_timestep(t)
    alpha_bar_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    alpha = alpha_bar / alpha_bar_prev  # this step's alpha, over a stride of several training timesteps
    beta = 1 - alpha
    x0_weight = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar)
    sample_weight = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return x0_weight * x0 + sample_weight * sample


def noise_scale(scheduler, t, predicted_variance):
    """The standard deviation of x_{t-1}, from the scheduler's own `_get_variance`, which returns a
    log-variance for "learned_range" (IF-II), a standard deviation for "fixed_small_log" and a
    variance otherwise."""
    variance = scheduler._get_variance(t, predicted_variance=predicted_variance)
    if scheduler.config.variance_type == "learned_range":
        return torch.exp(0.5 * variance)
    if scheduler.config.variance_type == "fixed_small_log":
        return variance
    return variance**0.5


def ddpm_step(scheduler, model_output, t, sample, noise):
    """x_t -> x_{t-1} for a DDPMScheduler (see `takes_noise_ahead`), as its `step` computes it, with
    the random part given: `noise` (standard normal, shaped like `sample`) for t > 0, None at t = 0.

    model_output: the predicted noise, followed on channels by the predicted variance when the
    scheduler learned it. Returns the new sample."""
    channels = sample.shape[1]
    noise_pred, predicted_variance = model_output, None
    learned = scheduler.config.variance_type in ("learned", "learned_range")
    if learned and model_output.shape[1] == 2 * channels:
        noise_pred, predicted_variance = model_output.split(channels, dim=1)
    x0 = predicted_x0(scheduler, noise_pred, t, sample)
    mean = posterior_mean(scheduler, x0, t, sample)
    if noise is None:
        if t > 0:  # a silent mean instead of a sample would go unnoticed
            raise ValueError(f"a DDPM step at timestep {int(t)} needs its noise (see noise_ahead)")
        return mean
    return mean + noise_scale(scheduler, t, predicted_variance) * noise
