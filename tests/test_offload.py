"""The low-memory plan's weights (show1.offload): one host copy, uploaded for its stage, never moved back.

Whole videos run on the tiny weights at small frame sizes (the stages' size constants patched, as in
tests/test_device_sync.py: which tensors move does not depend on the frame size), on the CPU and on
the virtual CUDA device of tests/device_trace.py, which records every host<->device copy.
"""

import pytest
import torch

from bench import fake_memory
from bench.random_weights import random_components
from conftest import FAST
from device_trace import VirtualDevice
from show1 import Show1Pipeline
from show1.components import STAGES
from show1.offload import (
    ALIGNMENT,
    BLOCK_BYTES,
    HostCopies,
    WeightUploads,
    nbytes,
    pack,
    pinned_footprint,
    swap_to_device_copies,
    weight_tensors,
)
from show1.plans import (
    LOW_MEMORY,
    LOW_MEMORY_GOAL_GIB,
    PREDICTED_PEAK_GIB,
    PREDICTED_STAGE_ACTIVATIONS_GIB,
    PREDICTED_STAGE_WEIGHTS_GIB,
    REFERENCE_PLAN,
    RESIDENT,
    prefetch_fits,
)
from show1.stages import keyframes, sr2

GIB = 2**30
PROMPT = "a fox in the snow"
SETTINGS = {**FAST, "seed": 5}  # every stage, one or two steps each


# Host copies


def test_pieces_are_packed_into_blocks_without_overlap():
    sizes = [100, 3000, 0, 900, 5000, 2000, 1]
    used, places = pack(sizes, block_bytes=4096)
    spans = {}
    for size, (block, offset) in zip(sizes, places):
        assert offset % ALIGNMENT == 0
        spans.setdefault(block, []).append((offset, offset + size))
    for block, block_spans in spans.items():
        block_spans.sort()
        assert all(end <= start for (_, end), (start, _) in zip(block_spans, block_spans[1:]))
        assert block_spans[-1][1] <= used[block]
    assert used[places[4][0]] == 5120  # larger than a block: a block of its own
    # The smaller pieces fill the room that the larger ones left.
    assert used == [5120, 4096, 3072] and places[3][0] == places[1][0] and places[0][0] == places[5][0]


def test_host_copies_hold_the_same_values_and_take_the_tensors_place():
    network = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)).half()
    tensors = weight_tensors([network])
    before = [t.detach().clone() for t in tensors]
    host = HostCopies(tensors, pin=False)
    assert len(host.block_sizes) == 1
    for tensor, copy, value in zip(tensors, host.copies, before):
        assert tensor.data_ptr() == copy.data_ptr() and tensor.dtype == value.dtype
        assert torch.equal(tensor, value)
    assert network(torch.ones(2, 3, dtype=torch.half)).shape == (2, 5)


def test_pinned_host_copies_take_little_more_than_the_weights_at_the_published_sizes():
    """The pinned-memory allocator rounds each block up to a power of two: pinning every tensor on
    its own would take a third more than the weights."""
    networks = fake_memory.published_networks_on_meta()
    tensors = weight_tensors(networks.networks())
    weights = sum(nbytes(t) for t in tensors)
    host = HostCopies(tensors, pin=False)  # on meta: the same packing, nothing allocated
    assert pinned_footprint(host.block_sizes) < weights + 0.2 * GIB
    assert pinned_footprint([nbytes(t) for t in tensors]) > weights + 8 * GIB
    assert max(nbytes(t) for t in tensors) <= BLOCK_BYTES


# The plan's numbers


# The fake-tensor prediction at the published sizes and the plans' transfers (bench.fake_memory,
# bench.transfers), in GiB, as `script/gpu-check --dry-run` computes them: one run (conftest.py).


def test_predicted_stage_numbers_are_the_fake_tensor_prediction(published_dry_run):
    _, prediction = published_dry_run
    for stage in STAGES:
        predicted = prediction["stages"][stage]
        assert PREDICTED_STAGE_WEIGHTS_GIB[stage] == pytest.approx(predicted["weights_gib"], abs=0.01), stage
        assert PREDICTED_STAGE_ACTIVATIONS_GIB[stage] == pytest.approx(predicted["activations_gib"], abs=0.01), stage
    for plan in (RESIDENT, LOW_MEMORY):
        assert PREDICTED_PEAK_GIB[plan.name] == pytest.approx(prediction["predicted_peak_gib"][plan.name], abs=0.01)


def test_prefetching_keeps_the_low_memory_peak_within_its_goal(published_dry_run):
    _, prediction = published_dry_run
    assert prediction["predicted_peak_gib"][LOW_MEMORY.name] <= LOW_MEMORY_GOAL_GIB
    # T5 fills most of the goal on its own: nothing is prefetched during the text stage.
    assert [prediction["stages"][stage]["prefetches"] for stage in STAGES] == [
        None, "interpolation", "first_frame", "sr1", "sr2", None]
    assert not prefetch_fits("text", "keyframes")


def test_a_default_video_uploads_each_weight_once_where_the_reference_moves_it_there_and_back(published_dry_run):
    _, prediction = published_dry_run
    low_memory, reference = (prediction["transfers_gib"][plan.name] for plan in (LOW_MEMORY, REFERENCE_PLAN))
    assert low_memory["weights"] == pytest.approx(24.40, abs=0.01)
    # The same byte counts divided alike: equal GiB figures are equal byte counts.
    assert (low_memory["h2d"], low_memory["d2h"]) == (low_memory["weights"], 0)
    assert reference["h2d"] == reference["d2h"] == reference["weights"]


# Whole videos


@pytest.fixture(scope="module")
def small_frames():
    """Small frames in every stage: keyframes 8x8 (so 32x32 from first_frame on), sr2 32x32."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keyframes, "HEIGHT", 8)
        patch.setattr(keyframes, "WIDTH", 8)
        patch.setattr(sr2, "HEIGHT", 32)
        patch.setattr(sr2, "WIDTH", 32)
        yield


@pytest.fixture
def virtual_cuda(monkeypatch):
    """A VirtualDevice; the pipeline's end-of-stage synchronize has no CUDA to wait for."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return VirtualDevice()


def pipeline(weights, device, plan):
    loaded = Show1Pipeline.from_pretrained(weights, device="cpu", dtype=torch.float32)
    pipe = Show1Pipeline(loaded.components, device, plan)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stages_on_device(pipe, device):
    """The stages with a network on `device` (a VirtualDevice) now."""
    return [stage for stage in STAGES
            if any(device.on_device(next(n.parameters())) for n in pipe.components.networks(stage))]


def watch_stages_on_device(pipe, device):
    """[(stage of a network called, stages with networks on the device during that call)]."""
    calls = []
    for stage in STAGES:
        for network in pipe.components.networks(stage):
            network.register_forward_pre_hook(lambda *_, stage=stage: calls.append((stage, stages_on_device(pipe, device))))
    return calls


@pytest.fixture(scope="module")
def resident_frames(tiny_pipeline, small_frames):
    with torch.no_grad():
        return tiny_pipeline(PROMPT, **SETTINGS).frames


def test_a_low_memory_video_equals_the_resident_one_on_the_cpu(tiny_weights, small_frames, resident_frames):
    pipe = pipeline(tiny_weights, "cpu", LOW_MEMORY)
    with torch.no_grad():
        frames = pipe(PROMPT, **SETTINGS).frames
    assert (frames == resident_frames).all()


def test_a_low_memory_video_uploads_each_weight_once_and_copies_nothing_back(
        tiny_weights, small_frames, resident_frames, virtual_cuda):
    pipe = pipeline(tiny_weights, "cuda", LOW_MEMORY)
    tensors, host_copies = pipe._uploads.tensors, pipe._uploads.host.copies
    addresses = [copy.data_ptr() for copy in host_copies]
    weights = sum(nbytes(t) for t in tensors)
    calls = watch_stages_on_device(pipe, virtual_cuda)
    stage_ends = []

    for video in range(2):
        virtual_cuda.events.clear()
        calls.clear()
        with torch.no_grad(), virtual_cuda:
            frames = pipe(PROMPT, on_stage_end=lambda stage, _: stage_ends.append(stages_on_device(pipe, virtual_cuda)),
                          **SETTINGS).frames
        events = virtual_cuda.events
        print(f"\nvideo {video + 1}:\n{virtual_cuda.report([e for e in events if e.kind != 'h2d'])}")

        assert (frames == resident_frames).all()
        assert not [str(e) for e in events if e.kind == "mismatch"]
        # The only copies back to the host are the frames, which the video is made of.
        assert not [str(e) for e in events if e.kind == "d2h" and "show1/frames.py" not in e.where]
        # Every weight uploaded once, and only from the host copies.
        uploads = [e for e in events if e.kind == "h2d" and "show1/offload.py" in e.where]
        assert sum(e.nbytes for e in uploads) == weights and len(uploads) == len(tensors)
        # Each network ran with its own stage's networks on the device, and no other.
        assert {stage for stage, _ in calls} == set(STAGES)
        assert all(on_device == [stage] for stage, on_device in calls)
        assert stage_ends[-6:] == [[]] * 6
        # Between videos the networks wait on the host copies, which stay where they were made.
        assert [copy.data_ptr() for copy in host_copies] == addresses
        assert all(t.data_ptr() == copy.data_ptr() for t, copy in zip(tensors, host_copies))


def test_the_reference_plan_still_moves_each_weight_there_and_back(tiny_weights, small_frames, virtual_cuda):
    pipe = pipeline(tiny_weights, "cuda", REFERENCE_PLAN)
    weights = sum(nbytes(t) for t in weight_tensors(pipe.components.networks()))
    with torch.no_grad(), virtual_cuda:
        pipe(PROMPT, **SETTINGS)
    moves = [e for e in virtual_cuda.events if "show1/pipeline.py" in e.where and "_networks_on_device" in e.where]
    assert sum(e.nbytes for e in moves if e.kind == "h2d") == weights
    assert sum(e.nbytes for e in moves if e.kind == "d2h") == weights


# Prefetching on a side stream


class RecordedSideStream:
    """Stands in for show1.offload.SideStream: uploads at once, and records each upload (the stage
    of its tensors), each copy handed to the compute stream, and each wait for an upload. The upload
    of stage `fails` runs out of memory half-way."""

    def __init__(self, stage_of, fails=None):
        self.stage_of = stage_of
        self.fails = fails
        self.log = []
        self.handed_over = 0

    def upload(self, pairs):
        stage = self.stage_of[id(pairs[0][0])]
        if stage == self.fails:
            swap_to_device_copies(pairs[:len(pairs) // 2], "cuda")
            raise RuntimeError("CUDA out of memory")
        swap_to_device_copies(pairs, "cuda", on_copy=self._hand_over)
        self.log.append(("upload", stage))
        return stage  # the "event"

    def _hand_over(self, copy):
        self.handed_over += 1

    def wait(self, ready):
        self.log.append(("wait", ready))


def test_a_side_stream_prefetches_the_next_stage_where_it_fits():
    components = random_components("tiny", "cpu", torch.float32, networks_only=True)
    stage_of = {id(t): stage for stage in STAGES for t in weight_tensors(components.networks(stage))}
    side_stream = RecordedSideStream(stage_of)
    uploads = WeightUploads(components, "cuda", side_stream=side_stream)
    device = VirtualDevice()
    on_device = {}
    with device:
        for stage, next_stage in zip(STAGES, [*STAGES[1:], None]):
            with uploads.stage(stage, next_stage):
                side_stream.log.append(("run", stage))
                on_device[stage] = uploads.on_device
    assert side_stream.log == [
        ("upload", "text"), ("wait", "text"), ("run", "text"),
        ("upload", "keyframes"), ("wait", "keyframes"), ("upload", "interpolation"), ("run", "keyframes"),
        ("wait", "interpolation"), ("upload", "first_frame"), ("run", "interpolation"),
        ("wait", "first_frame"), ("upload", "sr1"), ("run", "first_frame"),
        ("wait", "sr1"), ("upload", "sr2"), ("run", "sr1"),
        ("wait", "sr2"), ("run", "sr2"),
    ]
    assert on_device["text"] == ["text"] and on_device["sr1"] == ["sr1", "sr2"]
    assert uploads.on_device == []
    # Every device copy was handed to the compute stream (record_stream) before its stage used it.
    assert side_stream.handed_over == len(stage_of)
    assert not [str(e) for e in device.events if e.kind in ("d2h", "mismatch")]


@pytest.mark.parametrize("failing", [None, "keyframes", "interpolation"])
def test_a_failure_leaves_no_device_copies(failing):
    """The stage fails (None), or its own upload, or the prefetch of the next stage's networks."""
    components = random_components("tiny", "cpu", torch.float32, networks_only=True)
    stage_of = {id(t): stage for stage in STAGES for t in weight_tensors(components.networks(stage))}
    uploads = WeightUploads(components, "cuda", side_stream=RecordedSideStream(stage_of, fails=failing))
    device = VirtualDevice()
    with device, pytest.raises(RuntimeError, match="out of memory"):
        with uploads.stage("keyframes", "interpolation"):
            assert uploads.on_device == ["keyframes", "interpolation"]
            raise RuntimeError("CUDA out of memory")
    assert uploads.on_device == []
    assert not any(device.on_device(t) for t in uploads.tensors)
    assert all(t.data_ptr() == copy.data_ptr() for t, copy in zip(uploads.tensors, uploads.host.copies))
