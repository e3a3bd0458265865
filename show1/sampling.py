"""The guided denoising loop shared by every stage, and seeded noise.

Every stage is the same algorithm: start from noise, and at each timestep run the network on the
classifier-free guidance batch [unconditional, conditional] with the stage's condition
concatenated on channels, guide the noise half of the output, and let the scheduler step on the
frames. The variance half of the output is kept only for schedulers that learned it (IF-II's DDPM).
"""

import torch


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator: every stage draws from its own, seeded with the user's seed, so the
    draws match the reference's whatever the device."""
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape, generator, device, dtype):
    """Normal noise drawn on the CPU in float32, then moved, so that devices and dtypes agree."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def frames_to_batch(video):
    """[B, C, F, H, W] -> [B*F, C, H, W]: schedulers (and their thresholding) work per frame."""
    b, c, f, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(images, num_frames):
    bf, c, h, w = images.shape
    return images.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def scheduler_step(scheduler, noise_pred, t, sample, generator):
    """One scheduler step on a video, frame by frame, in float32.

    The schedulers compute in the dtype they are given. In half precision the DPM-Solver's
    x0 = (x - sigma * eps) / alpha overflows float16 at t ~ 999 (1 / alpha ~ 20,000), and its
    dynamic thresholding turns the whole sample into NaN; float32 costs nothing next to a UNet call."""
    num_frames = sample.shape[2]
    prev = scheduler.step(
        frames_to_batch(noise_pred.float()), t, frames_to_batch(sample.float()), generator=generator
    ).prev_sample
    return batch_to_frames(prev, num_frames)


@torch.no_grad()
def guided_denoise(denoiser, scheduler, sample, timesteps, guidance_scale, condition=None, generator=None, progress=iter):
    """Runs classifier-free guided sampling on a video; returns the float32 sample.

    denoiser(model_input, t) -> output, both [2B, C, F, H, W], where model_input is the guidance
    batch of [sample ++ condition] and the first `sample.shape[1]` output channels are the noise.

    The loop works in float32 (see scheduler_step); each denoiser casts its input to its network's
    dtype. `timesteps` stay on the CPU, where the schedulers index their tables and branch on them:
    a timestep on the GPU would make each of those steps wait for the GPU. The network gets its
    timesteps from one copy of the schedule on the device, made before the loop.
    """
    channels = sample.shape[1]
    sample = sample.float()
    condition = None if condition is None else condition.float()
    timesteps = timesteps.cpu()
    model_timesteps = timesteps.to(sample.device)
    learned_variance = scheduler.config.get("variance_type") in ("learned", "learned_range")
    for i in progress(range(len(timesteps))):
        t = timesteps[i]
        model_input = sample if condition is None else torch.cat([sample, condition], dim=1)
        model_input = scheduler.scale_model_input(torch.cat([model_input, model_input]), t)
        uncond, cond = denoiser(model_input, model_timesteps[i]).float().chunk(2)
        noise_pred = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        if learned_variance:
            noise_pred = torch.cat([noise_pred, cond[:, channels:]], dim=1)
        sample = scheduler_step(scheduler, noise_pred, t, sample, generator)
    return sample


def unet_denoiser(unet, text_states, class_labels=None):
    """The denoiser of a Show-1 video UNet with fixed text states (and condition noise level)."""
    text_states = text_states.to(unet.dtype)

    def denoise(model_input, t):
        return unet(model_input.to(unet.dtype), t, encoder_hidden_states=text_states, class_labels=class_labels).sample

    return denoise


def image_unet_denoiser(unet, text_states, class_labels=None):
    """The denoiser of a 2-D image UNet used on one-frame videos [B, C, 1, H, W]."""
    video_denoiser = unet_denoiser(unet, text_states, class_labels)

    def denoise(model_input, t):
        return video_denoiser(model_input[:, :, 0], t)[:, :, None]

    return denoise
