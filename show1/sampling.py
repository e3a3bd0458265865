"""The guided denoising loop shared by every stage, the noise it starts from, and the noised
condition of the pixel super-resolution stages.

Every stage is the same algorithm: start from noise, and at each timestep run the network on the
classifier-free guidance batch [unconditional, conditional] with the stage's condition
concatenated on channels, guide the noise half of the output, and let the scheduler step on the
frames. The variance half of the output is kept only for schedulers that learned it (IF-II's DDPM).
"""

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from .step_noise import ddpm_step, noise_ahead, takes_noise_ahead


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator: every stage draws from its own, seeded with the user's seed, so the
    draws match the reference's whatever the device."""
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape, generator, device):
    """float32 normal noise drawn on the CPU, then moved, so that every device draws the same."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def initial_noise(scheduler, steps, shape, seed, device):
    """How a stage starts: a fresh generator seeded with the user's seed, the scheduler set to
    `steps` steps, and float32 noise of `shape` at the scheduler's initial scale, drawn first.
    Returns (noise, generator); the stage's later draws continue the same generator."""
    generator = seeded_generator(seed)
    scheduler.set_timesteps(steps)
    return randn(shape, generator, device) * scheduler.init_noise_sigma, generator


def frames_to_batch(video):
    """[B, C, F, H, W] -> [B*F, C, H, W]: schedulers (and their thresholding) work per frame."""
    b, c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(images, num_frames):
    bf, c, h, w = images.shape
    return images.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def noised_upscale(video, height, width, noise_level, noising_scheduler, generator):
    """The condition of the pixel super-resolution stages (first_frame, sr1): the low-resolution
    frames float32 [B, C, F, h, w], upscaled bilinearly to [B, C, F, height, width] and noised to
    `noise_level`, so that the network learns to fix upscaling artefacts."""
    upscaled = F.interpolate(frames_to_batch(video), (height, width), mode="bilinear", align_corners=True)
    upscaled = batch_to_frames(upscaled, video.shape[2])
    noise = randn(upscaled.shape, generator, upscaled.device)
    levels = torch.full((upscaled.shape[0],), noise_level, device=upscaled.device, dtype=torch.long)
    return noising_scheduler.add_noise(upscaled, noise, levels)


def guidance_batch(text, batch: int) -> torch.Tensor:
    """[2*batch, L, D]: `batch` rows of the unconditional text states, then `batch` conditional ones."""
    return torch.cat([text.uncond.expand(batch, -1, -1), text.cond.expand(batch, -1, -1)])


def scheduler_step(scheduler, noise_pred, t, sample, generator, noise=None):
    """One scheduler step on a video, frame by frame, in float32.

    The schedulers compute in the dtype they are given. In half precision the DPM-Solver's
    x0 = (x - sigma * eps) / alpha overflows float16 at t ~ 999 (1 / alpha ~ 20,000), and its
    dynamic thresholding turns the whole sample into NaN; float32 costs nothing next to a UNet call.

    noise: this step's random noise, drawn before the loop (show1.step_noise), for the schedulers
    that take it; the others draw what they need from `generator` themselves."""
    num_frames = sample.shape[2]
    noise_pred, frames = frames_to_batch(noise_pred.float()), frames_to_batch(sample.float())
    if takes_noise_ahead(scheduler):
        prev = ddpm_step(scheduler, noise_pred, t, frames, noise)
    else:
        prev = scheduler.step(noise_pred, t, frames, generator=generator).prev_sample
    return batch_to_frames(prev, num_frames)


def predict_noise(unet, model_input, t, text_states, class_labels):
    """The network's output [2B, C, F, H, W] for the guidance batch: the videos [B, C, F, H, W] under
    each of the 2B rows of text states. The Show-1 UNet takes each video once (its input layers,
    which read neither text nor timestep, run once per video); IF-II's 2-D UNet takes a one-frame
    video as images, one copy per row."""
    model_input = model_input.to(unet.dtype)
    if isinstance(unet, UNet2DConditionModel):
        images = model_input[:, :, 0].repeat(text_states.shape[0] // model_input.shape[0], 1, 1, 1)
        return unet(images, t, encoder_hidden_states=text_states, class_labels=class_labels).sample[:, :, None]
    return unet(model_input, t, encoder_hidden_states=text_states, class_labels=class_labels).sample


@torch.no_grad()
def guided_denoise(
    unet, scheduler, sample, timesteps, guidance_scale, text, *, condition=None, noise_level=None, generator=None,
    progress=iter,
):
    """Runs classifier-free guided sampling on a video batch [B, C, F, H, W]; returns the float32 sample.

    text: the stage's PromptEmbeddings (unconditional and conditional states). condition: frames
    concatenated to the sample on channels at every step. noise_level: how much noise the
    condition carries, for networks that take it as a class label. The text states and class
    labels make the guidance batch of 2B rows here, once, before the loop; the sample and its
    condition go to the network once per video (predict_noise). The first `sample.shape[1]` output
    channels of the network are the noise.

    The loop works in float32 (see scheduler_step); the network gets its input in its own dtype.
    `timesteps` stay on the CPU, where the schedulers index their tables and branch on them: a
    timestep on the GPU would make each of those steps wait for the GPU. The network gets its
    timesteps from one copy of the schedule on the device, made before the loop.
    """
    batch, channels = sample.shape[:2]
    sample = sample.float()
    condition = None if condition is None else condition.float()
    text_states = guidance_batch(text, batch).to(unet.dtype)
    class_labels = None
    if noise_level is not None:
        class_labels = torch.full((2 * batch,), noise_level, device=sample.device, dtype=torch.long)
    timesteps = timesteps.cpu()
    model_timesteps = timesteps.to(sample.device)
    learned_variance = scheduler.config.get("variance_type") in ("learned", "learned_range")
    # The noise a stochastic scheduler adds at each step, drawn now and copied to the device once:
    # drawn inside the step from the CPU generator, it would be copied, with a wait, every step.
    step_noise = noise_ahead(scheduler, timesteps, frames_to_batch(sample).shape, generator, sample.device)
    for i in progress(range(len(timesteps))):
        t = timesteps[i]
        model_input = sample if condition is None else torch.cat([sample, condition], dim=1)
        model_input = scheduler.scale_model_input(model_input, t)
        output = predict_noise(unet, model_input, model_timesteps[i], text_states, class_labels)
        uncond, cond = output.float().chunk(2)
        noise_pred = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        if learned_variance:
            noise_pred = torch.cat([noise_pred, cond[:, channels:]], dim=1)
        sample = scheduler_step(scheduler, noise_pred, t, sample, generator, step_noise[i])
    return sample
