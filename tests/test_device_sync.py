"""No stage's denoising loop makes the host wait for the GPU, or copies, beyond a short documented list.

Each stage runs a few denoising steps on the tiny weights with its networks and inputs on a virtual
CUDA device (tests/device_trace.py): computed on the CPU, but every synchronisation and every
host<->device copy a GPU would see is recorded with the step of the denoising loop it happens in.
A wait inside the loop stalls the GPU once per step (hundreds of times per video), so every step
must be free of them, except for what ALLOWED_PER_STEP lists, with its reason. What happens once
per stage, before or after its loop (the schedule's copy to the device, the initial noise, a final
check), is printed but not limited here.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from device_trace import VirtualDevice
from show1.stages import first_frame, interpolation, keyframes, sr1, sr2
from show1.stages.text import PromptEmbeddings, encode_clip

STEPS = 3

# What a denoising step may wait for or copy, per stage: {stage: {event kind: at most per step}}.
# Nothing today. IF-II's DDPM (first_frame) adds noise from the stage's CPU generator at every
# step but the last; show1.step_noise draws all of it before the loop and copies it once.
ALLOWED_PER_STEP = {}


def on_device(device, text):
    return PromptEmbeddings(device.place(text.uncond.clone()), device.place(text.cond.clone()))


def video_on_device(device, *shape):
    """A video in [-1, 1] of the given shape, as the previous stage leaves it on the device."""
    return device.place(torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)


def parts_on_device(device, parts):
    """A stage's components with its networks on the device and fresh copies of its schedulers."""
    return SimpleNamespace(**{
        name: device.place(part) if isinstance(part, torch.nn.Module) else copy.deepcopy(part)
        for name, part in vars(parts).items()
    })


# Where a stage waits does not depend on the sizes it works at: small ones keep the test fast.


def run_keyframes(device, c, text, monkeypatch):
    monkeypatch.setattr(keyframes, "NUM_KEYFRAMES", 2)
    monkeypatch.setattr(keyframes, "HEIGHT", 16)
    monkeypatch.setattr(keyframes, "WIDTH", 16)
    return keyframes.run(parts_on_device(device, c.keyframes), on_device(device, text),
                         steps=STEPS, guidance=9.0, seed=0, progress=device.progress)


def run_interpolation(device, c, text, monkeypatch):
    video = video_on_device(device, 1, 3, 2, 16, 16)  # one segment
    return interpolation.run(parts_on_device(device, c.interpolation), on_device(device, text), video,
                             steps=STEPS, guidance=4.0, seed=0, progress=device.progress)


def run_first_frame(device, c, text, monkeypatch):
    frame = video_on_device(device, 1, 3, 1, 8, 8)
    return first_frame.run(parts_on_device(device, c.first_frame), on_device(device, text), frame,
                           steps=STEPS, guidance=4.0, noise_level=150, seed=0, progress=device.progress)


def run_sr1(device, c, text, monkeypatch):
    video = video_on_device(device, 1, 3, 8, 8, 8)  # 8 frames: one window
    anchor = video_on_device(device, 1, 3, 1, 32, 32)
    return sr1.run(parts_on_device(device, c.sr1), on_device(device, text), video, anchor,
                   steps=STEPS, guidance=7.0, noise_level=250, seed=0, progress=device.progress)


def run_sr2(device, c, _, monkeypatch):
    monkeypatch.setattr(sr2, "HEIGHT", 64)
    monkeypatch.setattr(sr2, "WIDTH", 64)
    text = encode_clip(c.text.clip_tokenizer, c.text.clip, "a panda", "blur")
    video = video_on_device(device, 1, 3, 1, 32, 32)  # one frame
    return sr2.run(parts_on_device(device, c.sr2), on_device(device, text), video,
                   steps=STEPS + 1, strength=0.75, guidance=15.0, seed=0, progress=device.progress)


STAGES = {
    "keyframes": run_keyframes,
    "interpolation": run_interpolation,
    "first_frame": run_first_frame,
    "sr1": run_sr1,
    "sr2": run_sr2,
}


@pytest.mark.parametrize("stage", STAGES)
def test_denoising_steps_do_not_wait_for_the_device(stage, tiny_pipeline, reference_text, monkeypatch):
    device = VirtualDevice()
    with torch.no_grad(), device:
        output = STAGES[stage](device, tiny_pipeline.components, reference_text, monkeypatch)
        output_on_device = output.device == torch.device("cuda", 0)

    per_step = device.per_step()
    print(f"\n{stage}: events per step {[dict(counts) for counts in per_step.values()]}")
    print(f"{stage}: outside the denoising loop:\n{device.report(device.outside_loops())}")
    print(f"{stage}: inside the denoising loop:\n{device.report(device.in_loops()) or '  none'}")

    # The trace saw the stage run on the virtual device, one loop of STEPS steps.
    assert output_on_device
    assert device.loop_lengths == [STEPS]
    # Anywhere in the stage: nothing that would raise on a GPU (CPU and device tensors mixed).
    assert not [str(e) for e in device.events if e.kind == "mismatch"]
    allowed = ALLOWED_PER_STEP.get(stage, {})
    for step, counts in per_step.items():
        excess = {kind: n for kind, n in counts.items() if n > allowed.get(kind, 0)}
        events = "\n".join(str(e) for e in device.in_loops() if e.step == step)
        assert not excess, f"{stage}, loop/step {step}: {excess} beyond {allowed}:\n{events}"


def test_the_virtual_device_records_each_wait_and_copy_where_it_happens():
    device = VirtualDevice()
    generator = torch.Generator().manual_seed(0)
    host = torch.arange(10.0)
    with torch.no_grad(), device:
        linear = device.place(torch.nn.Linear(2, 2))
        x = linear(torch.ones(3, 2, device="cuda"))
        t = torch.full((), 3, device="cuda")
        assert linear.weight.device == x.device == t.device == torch.device("cuda", 0) and x.is_cuda
        assert host.device.type == x.cpu().device.type == "cpu"
        assert [v.device.type for v in x[0]] == ["cuda", "cuda"]
        cases = {
            "sync": [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(t), lambda: host[t],
                     lambda: x.nonzero(), lambda: x[x > 0], lambda: f"{x.sum():.1f}"],
            "d2h": [lambda: x.cpu(), lambda: x.to("cpu"), lambda: x.tolist(), lambda: torch.empty(2).copy_(x[0])],
            "h2d": [lambda: host.to("cuda"), lambda: host.cuda(), lambda: torch.tensor([1.0], device="cuda"),
                    lambda: x.new_tensor([1.0]), lambda: x[torch.tensor([0, 1])],
                    lambda: x.clone().copy_(torch.ones(3, 2))],
            "h2d-cpu-draw": [lambda: torch.randn(3, generator=generator).to("cuda"),
                             lambda: (torch.randn(3, generator=generator) * 2).to(x)],
            "mismatch": [lambda: x + host[:2], lambda: torch.randn(2, generator=generator, device="cuda")],
            None: [lambda: x * host[3], lambda: torch.zeros(3, device="cuda"), lambda: x.double(), lambda: x.to("cuda"),
                   lambda: torch.cat([x, x])[0], lambda: linear(x), lambda: torch.full((2,), 5, device="cuda")],
        }
        for kind, calls in cases.items():
            for call in calls:
                device.events.clear()
                call()
                assert [e.kind for e in device.events] == ([kind] if kind else []), (kind, device.events)
                assert all("tests/test_device_sync.py" in e.where.split(" <- ")[0] for e in device.events)

        device.events.clear()
        for _ in device.progress(range(2)):
            t.item()
        host[t]
    assert [(e.kind, e.step) for e in device.events] == [("sync", (0, 0)), ("sync", (0, 1)), ("sync", None)]
    assert device.per_step() == {(0, 0): {"sync": 1}, (0, 1): {"sync": 1}}


def test_the_trace_catches_a_ddpm_step_on_device_timesteps(tiny_pipeline):
    """What the first-frame stage did before its schedule stayed on the CPU: DDPM indexes its CPU
    tables with the timestep and branches on it, so a device timestep costs a wait each time."""
    scheduler = copy.deepcopy(tiny_pipeline.components.first_frame.scheduler)
    device = VirtualDevice()
    with torch.no_grad(), device:
        scheduler.set_timesteps(STEPS, device="cuda")
        sample = torch.zeros(1, 3, 8, 8, device="cuda")
        noise_and_variance = torch.zeros(1, 6, 8, 8, device="cuda")
        for t in device.progress(scheduler.timesteps[:1]):
            scheduler.step(noise_and_variance, t, sample, generator=torch.Generator().manual_seed(0))
    syncs = [e for e in device.in_loops() if e.kind == "sync"]
    print(f"\nDDPM step on a device timestep:\n{device.report(device.in_loops())}")
    assert len(syncs) >= 5
    assert any("indexed by a device scalar" in e.detail for e in syncs)


def test_a_tensor_lives_where_its_data_is_set_to():
    """Offloading swaps a parameter's data between a host copy and a device copy (show1.offload):
    the parameter follows its data, and only the copies count as transfers."""
    device = VirtualDevice()
    linear = torch.nn.Linear(2, 2)
    host = {parameter: parameter.data for parameter in linear.parameters()}
    with torch.no_grad(), device:
        for parameter, copy in host.items():
            parameter.data = copy.to("cuda", non_blocking=True)
        assert linear.weight.device == torch.device("cuda", 0)
        assert linear(torch.ones(1, 2, device="cuda")).is_cuda
        for parameter, copy in host.items():
            parameter.data = copy
        assert linear.weight.device == torch.device("cpu")
        assert not linear(torch.ones(1, 2)).is_cuda
    assert [e.kind for e in device.events] == ["h2d", "h2d"]
