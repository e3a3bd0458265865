"""The predictor behind Cog's real HTTP server (`python -m cog.server.http`, started by script/serve),
on the tiny weights and the CPU: what Replicate's web form, its API and `cog predict` talk to."""

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import requests
import yaml

from conftest import FAST
from serving import PREDICTION_TIMEOUT, ServerUnderTest
from show1.settings import OUTPUT_STAGES
from test_progress import assert_one_bar_to_the_end
from test_video import decode_mp4

REPO = Path(__file__).resolve().parents[1]
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")

STAGE_VIDEO_SHAPES = {
    "full": (29, 320, 576), "interpolated": (29, 40, 64), "keyframes": (8, 40, 64),
}
STAGES_RUN = {
    "keyframes": ["text", "keyframes"],
    "interpolated": ["text", "keyframes", "interpolation"],
    "full": ["text", "keyframes", "interpolation", "first_frame", "sr1", "sr2"],
}


@pytest.fixture(scope="module")
def server(cog_server):
    """The session's server on the tiny weights (conftest.py), shared with test_script_predict.py."""
    return cog_server


def succeeded(response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    prediction = response.json()
    assert prediction["status"] == "succeeded", prediction.get("error") or prediction
    return prediction


def save_data_uri(uri: str, path: Path) -> Path:
    header, data = uri.split(",", 1)
    assert header.endswith(";base64"), header
    path.write_bytes(base64.b64decode(data))
    return path


def assert_ready(server):
    """The server is up and serving: READY once the slot of the prediction it just answered is free
    (it frees it just after answering, later on a loaded machine; see wait_until_idle)."""
    server.wait_until_idle()
    assert server.health()["status"] == "READY"


# --- the server comes up and describes its inputs -----------------------------------------


def test_setup_reaches_ready_and_logs_what_it_loaded(server, tiny_weights):
    health = server.health()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"
    loaded = f"Show-1 loaded from {tiny_weights}"
    # Cog's server gathers setup's printed lines from a pipe and can end the gathering just before
    # the last line arrives (seen once in CI); that line then reaches only the server's own log.
    assert loaded in health["setup"]["logs"] or loaded in server.log_path.read_text(errors="replace")


EXPECTED_INPUTS = {
    # name: (JSON type, default, minimum, maximum, choices)
    "prompt": ("string", None, None, None, None),
    "negative_prompt": ("string", "low resolution, blur", None, None, None),
    "seed": ("integer", None, 0, 2**32 - 1, None),
    "keyframe_steps": ("integer", 75, 1, 500, None),
    "interpolation_steps": ("integer", 75, 1, 500, None),
    "first_frame_steps": ("integer", 70, 1, 500, None),
    "sr1_steps": ("integer", 125, 1, 500, None),
    "sr2_steps": ("integer", 50, 2, 500, None),  # 80% of the steps run: at least one
    "guidance_scale": ("number", 9.0, 1, 30, None),
    "fps": ("integer", 8, 1, 30, None),
    "output_format": ("string", "mp4", None, None, ["mp4", "gif"]),
    "output_stage": ("string", "full", None, None, ["full", "sr1", "interpolated", "keyframes"]),
}


def test_openapi_lists_every_input_with_type_default_and_constraints(server):
    response = requests.get(f"{server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    schemas = response.json()["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    # The server re-sorts the keys; the web form orders the inputs by x-order.
    assert sorted(properties, key=lambda name: properties[name]["x-order"]) == list(EXPECTED_INPUTS)
    assert schemas["Input"]["required"] == ["prompt"]
    for name, (json_type, default, minimum, maximum, choices) in EXPECTED_INPUTS.items():
        prop = properties[name]
        assert prop["description"].strip(), name
        assert prop.get("default") == default, name
        assert prop.get("minimum") == minimum and prop.get("maximum") == maximum, name
        if choices:
            (reference,) = prop["allOf"]
            enum = schemas[reference["$ref"].rsplit("/", 1)[1]]
            assert (enum["type"], enum["enum"]) == (json_type, choices), name
        else:
            assert prop["type"] == json_type, name
    assert properties["seed"]["nullable"] is True
    assert set(EXPECTED_INPUTS["output_stage"][4]) == set(OUTPUT_STAGES)
    assert schemas["Output"] == {"title": "Output", "type": "string", "format": "uri"}


# --- predictions ---------------------------------------------------------------------------


# Cog's own schema generator (the code `cog build` runs): tests/fixtures/cog_openapi_schema.json is
# its output for predict.py. Where the generator is at hand (this project's CI has it beside the
# checkout; elsewhere set COG_OPENAPI_SCHEMA), its live output is compared too, so that a change to
# predict.py that forgets to refresh the fixture fails there.
COG_SCHEMA_FIXTURE = REPO / "tests" / "fixtures" / "cog_openapi_schema.json"
COG_SCHEMA_GENERATOR = Path(os.environ.get("COG_OPENAPI_SCHEMA") or REPO.parent / "shared" / "cog" / "cog-openapi-schema")


def comparable_schema(schema: dict) -> dict:
    """A schema without what may differ between writers of the same schema: number spelling (9.0
    and 9) and the Cog version in info.version."""

    def normalised(value):
        if isinstance(value, dict):
            return {key: normalised(item) for key, item in value.items()}
        if isinstance(value, list):
            return [normalised(item) for item in value]
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    schema = normalised(schema)
    schema["info"] = {key: item for key, item in schema["info"].items() if key != "version"}
    return schema


def test_the_served_schema_is_the_one_cog_build_writes(server):
    served = comparable_schema(requests.get(f"{server.url}/openapi.json", timeout=10).json())
    assert served == comparable_schema(json.loads(COG_SCHEMA_FIXTURE.read_text()))
    if COG_SCHEMA_GENERATOR.is_file():
        generated = subprocess.run(
            [str(COG_SCHEMA_GENERATOR), str(REPO), "predict.py:Predictor"], capture_output=True, text=True, check=True
        ).stdout
        assert served == comparable_schema(json.loads(generated)), "refresh tests/fixtures/cog_openapi_schema.json"


def test_full_video_is_a_playable_576x320_mp4_with_29_frames(server, tmp_path):
    prediction = succeeded(server.post(prompt="a red panda eating bamboo", seed=7, output_stage="full", **FAST))

    video = save_data_uri(prediction["output"], tmp_path / "full.mp4")
    frames, meta = decode_mp4(video)
    assert frames.shape == (29, 320, 576, 3)
    assert (meta["codec"], meta["fps"]) == ("h264", 8)
    assert meta["pix_fmt"].startswith("yuv420p")
    assert frames.std() > 1, "the video should not be a flat colour"

    assert prediction["metrics"]["seed"] == 7
    assert set(prediction["metrics"]["stage_seconds"]) == set(STAGES_RUN["full"])
    assert all(seconds >= 0 for seconds in prediction["metrics"]["stage_seconds"].values())
    logs = prediction["logs"]
    assert "Using seed: 7" in logs
    assert [line.split()[1] for line in logs.splitlines() if line.startswith("Stage ")] == STAGES_RUN["full"]
    # Replicate's progress bar, read from the logs as its JavaScript client reads it.
    assert_one_bar_to_the_end(logs)
    assert "\r" not in logs


# output_stage=sr1 through this server: test_script_predict.py (its --url prediction).
@pytest.mark.parametrize("output_stage", ["interpolated", "keyframes"])
def test_each_early_output_stage_gives_its_size_and_frame_count(server, tmp_path, output_stage):
    prediction = succeeded(server.post(prompt="a lighthouse in a storm", output_stage=output_stage, fps=12, **FAST))

    frames, meta = decode_mp4(save_data_uri(prediction["output"], tmp_path / "video.mp4"))
    assert frames.shape == STAGE_VIDEO_SHAPES[output_stage] + (3,)
    assert (meta["codec"], meta["fps"]) == ("h264", 12)
    assert set(prediction["metrics"]["stage_seconds"]) == set(STAGES_RUN[output_stage])


def test_gif_output(server, tmp_path):
    response = server.post(prompt="a paper boat", output_stage="keyframes", output_format="gif", fps=4, **FAST)
    prediction = succeeded(response)

    assert prediction["output"].startswith("data:image/gif;base64,")
    gif = save_data_uri(prediction["output"], tmp_path / "video.gif")
    assert iio.imread(gif, plugin="pillow", index=None, mode="RGB").shape == (8, 40, 64, 3)
    assert iio.immeta(gif, plugin="pillow", index=0)["duration"] == 250


def test_a_seed_reproduces_the_video_and_no_seed_draws_a_new_one(server, tmp_path):
    def keyframes(**inputs):
        prediction = succeeded(server.post(prompt="a snowy forest", output_stage="keyframes", **FAST, **inputs))
        path = save_data_uri(prediction["output"], tmp_path / f"{prediction['id']}.mp4")
        return decode_mp4(path)[0], prediction["metrics"]["seed"]

    first, seed = keyframes(seed=1234)
    again, _ = keyframes(seed=1234)
    other, _ = keyframes(seed=4321)
    assert seed == 1234
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    drawn = {keyframes()[1] for _ in range(2)}
    assert len(drawn) == 2 and all(0 <= seed < 2**32 for seed in drawn)


def test_the_output_file_name_is_unique_and_not_taken_from_the_prompt(server):
    prompt = "../../etc/passwd; rm -rf ~ $(reboot)"
    prediction = succeeded(server.post(prompt=prompt, output_stage="keyframes", **FAST))
    (video,) = server.output_dir().iterdir()
    assert video.name.startswith("show1-") and video.suffix == ".mp4"
    assert "passwd" not in video.name and len(video.stem) == len("show1-") + 32
    assert prediction["output"].startswith("data:video/mp4;base64,")


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("keyframe_steps", 0),
        ("sr1_steps", 501),
        ("interpolation_steps", "many"),
        ("first_frame_steps", 2.5),
        ("guidance_scale", 0.5),
        ("guidance_scale", "high"),
        ("fps", 0),
        ("fps", 31),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", "lucky"),
        ("output_stage", "huge"),
        ("output_format", "webm"),
        ("output_format", "../../x"),
        ("prompt", 42),
    ],
)
def test_out_of_range_or_wrongly_typed_input_is_422(server, name, value):
    inputs = {"prompt": "a cat", "output_stage": "keyframes", **FAST, name: value}
    response = server.post(**inputs)
    assert response.status_code == 422, response.text[:500]
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "input", name]
    assert_ready(server)


def test_missing_prompt_is_422(server):
    response = server.post(output_stage="keyframes")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "input", "prompt"]


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_an_empty_prompt_fails_with_a_clear_message_and_the_server_stays_ready(server, prompt):
    response = server.post(prompt=prompt, output_stage="keyframes", **FAST)
    assert response.status_code == 200
    prediction = response.json()
    assert prediction["status"] == "failed"
    assert "prompt" in prediction["error"].lower() and "empty" in prediction["error"].lower()
    assert_ready(server)
    succeeded(server.post(prompt="a cat", output_stage="keyframes", **FAST))


def test_a_stage_with_nan_fails_the_prediction_clearly_and_the_next_one_succeeds(tiny_weights, tmp_path):
    """A numerical failure (here: the interpolation UNet made to output NaN) fails the prediction
    with a message naming the stage, instead of encoding a garbage video; the container stays READY
    and a prediction that stops before that stage succeeds."""
    import torch

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    unet_file = weights / "show-1-interpolation" / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(unet_file, weights_only=True)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    torch.save(state, unet_file)
    cog = ServerUnderTest(weights, tmp_path)
    try:
        assert cog.wait_for_setup()["status"] == "READY", cog.log_tail()
        response = cog.post(prompt="a cat", output_stage="interpolated", **FAST)
        assert response.status_code == 200
        prediction = response.json()
        assert prediction["status"] == "failed"
        assert "Stage 'interpolation' produced non-finite values" in prediction["error"]
        assert "numerical problem" in prediction["error"]
        assert prediction.get("output") is None
        assert_ready(cog)
        succeeded(cog.post(prompt="a cat", output_stage="keyframes", **FAST))
    finally:
        cog.stop()


# --- a long-running container -------------------------------------------------------------


def process_usage(pid: int) -> dict:
    """Open descriptors and resident memory. A leak is anonymous memory (rss_anon_mb); the
    file-backed part of the resident set (memory-mapped weights, libraries, about 130 MB here) moves
    as the kernel drops those pages and maps them again when other processes need the memory."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    megabytes = {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon")}
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_mb": megabytes["VmRSS"], "rss_anon_mb": megabytes["RssAnon"]}


def folder_usage(folder: Path) -> dict:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {"files": len(files), "bytes": sum(path.stat().st_size for path in files)}


def test_twenty_predictions_in_a_row_leave_no_files_descriptors_or_memory_behind(server):
    worker = server.worker_pid()

    def run(count):
        """The predictions' ids, and the worker's anonymous memory after each."""
        ids, anonymous_mb = [], []
        for _ in range(count):
            ids.append(succeeded(server.post(prompt="a cat", output_stage="keyframes", **FAST))["id"])
            anonymous_mb.append(process_usage(worker)["rss_anon_mb"])
        return ids, anonymous_mb

    # A leak would grow with every prediction. Allocator effects do not: without MALLOC_ARENA_MAX=2
    # (cog.yaml, script/serve) the anonymous memory grew in 55 MB steps as predictions landed on new
    # malloc arenas; with it, +0 MB over 60 predictions (docs/performance.md,
    # 'Host memory of the server'). It still moves up and down between predictions, by up to
    # 100 MB after the session's full video (939 to 1039 MB over 40 keyframe predictions; 1402 to
    # 1497 MB before the UNet took each video once), as freed blocks stay with glibc or go back:
    # two single readings can differ by that much, so each side is the lowest of its last 5
    # readings, which a leak raises and those swings do not.
    _, warmup_mb = run(10)  # warm-up: lazy imports, allocator pools and encoder start-up settle
    before = {**process_usage(worker), **folder_usage(server.tmpdir), "rss_anon_mb": min(warmup_mb[-5:])}
    started = time.monotonic()
    prediction_ids, measured_mb = run(20)
    seconds = (time.monotonic() - started) / 20
    after = {**process_usage(worker), **folder_usage(server.tmpdir), "rss_anon_mb": min(measured_mb[-5:])}
    print(f"\n20 keyframe predictions, {seconds:.2f} s each; worker and temp folder before: {before}, after: {after}"
          f"; anonymous MB after each: {warmup_mb} then {measured_mb}")

    assert server.worker_pid() == worker, "the worker must not have been restarted"
    # Cog's server keeps a folder per prediction (for file inputs) under /tmp/coglet: nothing may be left in it.
    left = [path for name in prediction_ids for path in COGLET_PREDICTIONS.glob(f"{name}/**/*") if path.is_file()]
    assert left == []
    assert after["files"] == before["files"] == 1, "only the latest output may remain"
    assert after["bytes"] < before["bytes"] * 2 + 100_000
    assert after["fds"] <= before["fds"] + 2
    assert after["rss_anon_mb"] < before["rss_anon_mb"] + 60


def test_the_worker_runs_with_the_images_environment(server):
    """Without MALLOC_ARENA_MAX=2, glibc's per-thread arenas made the worker's anonymous memory grow
    in steps of about 55 MB as Cog's prediction threads landed on new arenas (+130 MB over 60
    keyframe predictions here); with it, flat. script/serve sets what cog.yaml sets in the image."""
    environ = Path(f"/proc/{server.worker_pid()}/environ").read_bytes().split(b"\0")
    image_environment = yaml.safe_load((REPO / "cog.yaml").read_text())["environment"]
    assert {"MALLOC_ARENA_MAX=2", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"} <= set(image_environment)
    for variable in image_environment:
        assert variable.encode() in environ, variable


# --- async predictions, webhooks and cancellation ----------------------------------------------


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that queues every webhook body it receives."""

    def __init__(self):
        self.events = queue.Queue()
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events.put(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/webhook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, condition, timeout=PREDICTION_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no matching webhook arrived in time"
            event = self.events.get(timeout=remaining)
            if condition(event):
                return event

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def post_async(server, prediction_id, webhook_url, **inputs):
    return requests.post(
        f"{server.url}/predictions",
        json={"id": prediction_id, "input": inputs, "webhook": webhook_url},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )


def test_async_prediction_reports_to_its_webhook(server, webhooks, tmp_path):
    response = post_async(server, "async-1", webhooks.url, prompt="a kite", output_stage="keyframes", **FAST)
    assert response.status_code == 202

    final = webhooks.wait_for(lambda event: event["status"] in ("succeeded", "failed", "canceled"))
    assert final["id"] == "async-1" and final["status"] == "succeeded", final.get("error")
    frames, _ = decode_mp4(save_data_uri(final["output"], tmp_path / "async.mp4"))
    assert frames.shape == (8, 40, 64, 3)


def test_a_cancelled_prediction_cleans_up_and_the_next_one_succeeds(server, webhooks):
    # Enough work that the cancellation lands in the middle of the cascade.
    slow = dict(FAST, sr1_steps=4, sr2_steps=10)
    response = post_async(server, "to-cancel", webhooks.url, prompt="a long drive", output_stage="full", **slow)
    assert response.status_code == 202
    webhooks.wait_for(lambda event: "Stage keyframes finished" in (event.get("logs") or ""))

    busy = server.post(prompt="a cat", output_stage="keyframes", wait_until_idle=False, **FAST)
    assert busy.status_code == 409

    assert requests.post(f"{server.url}/predictions/to-cancel/cancel", timeout=10).status_code == 200
    final = webhooks.wait_for(lambda event: event["status"] in ("succeeded", "failed", "canceled"))
    assert final["status"] == "canceled"
    assert "Cancelled after stages: text, keyframes" in final["logs"]
    assert "sr2" not in final["metrics"]["stage_seconds"]
    assert list(server.output_dir().iterdir()) == [], "a cancelled prediction leaves no file"

    # The webhook reports the cancellation as soon as it is decided; the worker then unwinds the
    # interrupted stage (a UNet call runs to its end) and frees its memory before the slot is free.
    assert_ready(server)
    prediction = succeeded(server.post(prompt="a cat", output_stage="keyframes", **FAST))
    assert prediction["output"].startswith("data:video/mp4;base64,")


# --- setup failures (a server each) ----------------------------------------------------------


def failed_setup(weights, workdir) -> tuple:
    cog = ServerUnderTest(weights, workdir)
    try:
        health = cog.wait_for_setup()
        response = cog.post(prompt="a cat", timeout=30)
        return health, response
    finally:
        cog.stop()


def test_a_missing_weights_folder_fails_setup_naming_the_folder_and_the_fix(tmp_path):
    missing = tmp_path / "no-weights-here"
    health, response = failed_setup(missing, tmp_path)
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert str(missing) in logs and "script/download-weights" in logs
    assert response.status_code == 503


def test_incomplete_weights_fail_setup_naming_the_missing_file(tiny_weights, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    missing = weights / "show-1-sr2" / "vae" / "diffusion_pytorch_model.bin"
    missing.unlink()
    health, _ = failed_setup(weights, tmp_path)
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert str(missing.parent) in logs and "script/download-weights" in logs
