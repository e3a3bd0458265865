"""script/predict: one video from the command line, through Cog's own HTTP server, without Docker.

    script/predict -i prompt="a red panda eating bamboo" [-i NAME=VALUE ...] [-o PATH] [--tiny | --url URL]

The same inputs as `cog predict`. It starts script/serve (the server the image runs) on a free
loopback port, waits for the predictor's setup, posts one prediction, writes the video to PATH
(default output.<ext> in the current folder) and stops the server again, whatever happens.
The server's own log goes to a temporary file, kept (and named) only when something failed; the
prediction's log lines (seed, progress, stages) are echoed as they arrive.

With --url it uses a server that is already running (script/serve, or `docker run` of the image)
and leaves it running: no setup to wait for on every call. Its log is not ours to read, so the
prediction's log lines are printed when it has ended.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from cog_server import REPO, CogClient, CogServer, ServerExited, SetupTimeout

TINY_WEIGHTS = REPO / "tests" / "fixtures" / "reference" / "weights"
# Loading the real weights from disk takes minutes; the tiny ones seconds.
SETUP_TIMEOUT_SECONDS = 1800
# Enough for the full default cascade on a slow GPU; a CPU with tiny weights needs far less.
PREDICTION_TIMEOUT_SECONDS = 6 * 3600
# The stages in the order they run (show1.components.STAGES, not imported: it would load torch).
STAGE_ORDER = ("text", "keyframes", "interpolation", "first_frame", "sr1", "sr2")

TINY_NOTE = (
    "Note: --tiny uses the tiny random test weights (tests/fixtures/reference/weights). They run the\n"
    "whole cascade on a CPU in minutes but produce noise, not a picture."
)


class Failure(Exception):
    """A failure to report to the user in one message, without a traceback."""


class InputError(Failure):
    """An input the user should correct; the server's log has nothing to add to the message."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="script/predict",
        description="Run one Show-1 prediction through Cog's HTTP server (no Docker needed).",
    )
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                        help="an input, as for `cog predict` (repeat for several)")
    parser.add_argument("-o", "--output", metavar="PATH",
                        help="where to write the video (default: output.<ext> in the current folder)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--tiny", action="store_true",
                         help="use the tiny random test weights (noise, not a picture; for a CPU)")
    weights.add_argument("--url", metavar="URL",
                         help="use the Cog server already running at URL (e.g. http://127.0.0.1:5000, "
                              "started by script/serve) instead of starting one; its logs are printed at the end")
    return parser.parse_args(argv)


def split_inputs(pairs):
    """['seed=3', 'prompt=a=b'] -> {'seed': '3', 'prompt': 'a=b'}; values stay text until the
    server's schema says what type each input has."""
    inputs = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise InputError(f"-i takes NAME=VALUE, got {pair!r}")
        inputs[name] = value
    return inputs


def weights_folder(tiny: bool) -> Path:
    """--tiny: the test weights; otherwise $SHOW1_WEIGHTS or weights/, which must hold weights."""
    if tiny:
        return TINY_WEIGHTS
    folder = Path(os.environ.get("SHOW1_WEIGHTS") or REPO / "weights").resolve()
    # Each of the five weight repos has a model_index.json at its top.
    if not any(folder.glob("*/model_index.json")):
        raise Failure(
            f"No weights in {folder}. Fetch them with script/download-weights (about 34 GB fetched,\n"
            "26.5 GB on disk; see docs/weights.md), set SHOW1_WEIGHTS to a folder that holds them, or try\n"
            "the pipeline on the tiny test weights with --tiny (noise, not a picture)."
        )
    return folder


def typed_inputs(raw: dict, properties: dict) -> dict:
    """Each -i value converted to its input's JSON type, as `cog predict` does. A value that does
    not convert is sent as text, so that the server refuses it with its own message (422)."""
    unknown = sorted(set(raw) - set(properties))
    if unknown:
        # The server silently drops unknown fields; a typo must not go unnoticed.
        raise InputError(f"Unknown input {', '.join(unknown)}. Inputs: {', '.join(sorted(properties))}.")
    converters = {"integer": int, "number": float}
    typed = {}
    for name, value in raw.items():
        convert = converters.get(properties[name].get("type"), str)
        try:
            typed[name] = convert(value)
        except ValueError:
            typed[name] = value
    return typed


def echo_prediction_logs(log_path: Path, stop: threading.Event):
    """Prints the prediction's own log lines (seed, progress, stages) from the server's JSON log as
    they arrive, so a long prediction shows that it is moving."""
    with open(log_path, errors="replace") as log:
        while True:
            line = log.readline()
            if not line:
                if stop.is_set():
                    return
                time.sleep(0.2)
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not one of the server's JSON lines
            fields = entry.get("fields", {})
            # What the predictor printed, not the server's own remarks about the prediction.
            if entry.get("target") == "coglet::prediction" and fields.get("source") in ("Stdout", "Stderr"):
                print(f"  {fields.get('message', '')}")


def refusal_message(response: requests.Response) -> str:
    """Cog's 422 answer in one line per refused input: 'keyframe_steps: 0 is less than the minimum of 1'."""
    try:
        details = response.json()["detail"]
        return "\n".join(f"  {error['loc'][-1]}: {error['msg']}" for error in details)
    except (ValueError, KeyError, TypeError, IndexError):
        return response.text[:2000]


def write_output(data_uri: str, path_option) -> Path:
    """Decodes the data URI the server returns into PATH, or output.<ext> in the current folder
    (the extension from the file's media type, never from an input)."""
    header, data = data_uri.split(",", 1)
    media_type = header.removeprefix("data:").split(";", 1)[0]
    extension = {"video/mp4": "mp4", "image/gif": "gif"}.get(media_type)
    if extension is None:
        raise Failure(f"Unexpected output type {media_type!r}.")
    path = Path(path_option) if path_option else Path(f"output.{extension}")
    path.write_bytes(base64.b64decode(data))
    return path


def report(prediction: dict, path: Path):
    metrics = prediction.get("metrics", {})
    stages = metrics.get("stage_seconds", {})
    # The server sorts metric names; list the stages in the order they ran.
    ordered = sorted(stages, key=lambda stage: STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER))
    print(f"Seed: {metrics.get('seed')}")
    print(
        "Seconds per stage: " + ", ".join(f"{stage} {stages[stage]:.1f}" for stage in ordered)
        + f" (total {sum(stages.values()):.1f})"
    )
    print(f"Wrote {path}")


def predict_while_echoing(server: CogServer, inputs: dict) -> requests.Response:
    """The prediction, its log lines printed from the server's log as they arrive."""
    stop_echo = threading.Event()
    echo = threading.Thread(target=echo_prediction_logs, args=(server.log_path, stop_echo), daemon=True)
    echo.start()
    try:
        return server.predict(inputs, PREDICTION_TIMEOUT_SECONDS)
    finally:
        stop_echo.set()
        echo.join(timeout=5)


def predict_then_print_logs(client: CogClient, inputs: dict) -> requests.Response:
    """The prediction on a server started elsewhere, whose log is not ours to read: its log lines
    are printed once it has ended."""
    response = client.predict(inputs, PREDICTION_TIMEOUT_SECONDS)
    if response.status_code == 200:
        for line in (response.json().get("logs") or "").splitlines():
            print(f"  {line}")
    return response


def run_prediction(server: CogClient, raw_inputs: dict, output_option) -> None:
    try:
        health = server.wait_for_setup(SETUP_TIMEOUT_SECONDS)
    except (ServerExited, SetupTimeout) as error:
        raise Failure(str(error)) from None
    if health.get("status") not in ("READY", "BUSY"):
        logs = (health.get("setup") or {}).get("logs", "")
        raise Failure(f"The predictor's setup failed ({health.get('status')}):\n{logs}")
    inputs = typed_inputs(raw_inputs, server.input_schema())
    print("Predicting...")
    if isinstance(server, CogServer):
        response = predict_while_echoing(server, inputs)
    else:
        response = predict_then_print_logs(server, inputs)

    if response.status_code == 422:
        raise InputError(f"Input refused:\n{refusal_message(response)}")
    if response.status_code == 409:
        raise Failure("The server is busy with another prediction (it runs one at a time); try again when it ends.")
    if response.status_code != 200:
        raise Failure(f"The server answered HTTP {response.status_code}: {response.text[:2000]}")
    prediction = response.json()
    if prediction.get("status") != "succeeded":
        raise Failure(f"The prediction {prediction.get('status')}: {prediction.get('error')}")
    report(prediction, write_output(prediction["output"], output_option))


def interrupt(signum, frame):
    """SIGTERM (e.g. `kill`) ends this script like Ctrl-C does: through main's cleanup."""
    raise KeyboardInterrupt


def predict_on_running_server(url: str, raw_inputs: dict, output_option) -> int:
    """--url: one prediction on a server started elsewhere, which is left running."""
    client = CogClient(url)
    try:
        client.health()
    except requests.RequestException:
        print(f"script/predict: no Cog server answers at {client.url} (start one with script/serve)", file=sys.stderr)
        return 1
    try:
        run_prediction(client, raw_inputs, output_option)
        return 0
    except Failure as failure:
        print(f"script/predict: {failure}", file=sys.stderr)
    except KeyboardInterrupt:
        print("script/predict: interrupted (the prediction goes on on the server)", file=sys.stderr)
    return 1


def predict_on_own_server(weights: Path, raw_inputs: dict, output_option) -> int:
    """script/serve started on `weights` for one prediction and stopped again, whatever happens."""
    print(f"Starting Cog's HTTP server on the weights in {weights} (setup loads every stage)...")
    log_dir = Path(tempfile.mkdtemp(prefix="show1-predict-"))
    server = CogServer(weights, log_dir / "server.log")
    exit_status, keep_log = 1, True
    try:
        run_prediction(server, raw_inputs, output_option)
        exit_status, keep_log = 0, False
    except InputError as error:
        print(f"script/predict: {error}", file=sys.stderr)
        keep_log = False
    except Failure as failure:
        print(f"script/predict: {failure}", file=sys.stderr)
    except KeyboardInterrupt:
        print("script/predict: interrupted", file=sys.stderr)
    finally:
        server.stop()
        if keep_log:
            print(f"script/predict: the server's log is in {log_dir / 'server.log'}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return exit_status


def main(argv) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    # Each line as it is printed, also into a pipe or a file: progress is only useful live.
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    try:
        raw_inputs = split_inputs(args.input)
        weights = None if args.url else weights_folder(args.tiny)
    except Failure as failure:
        print(f"script/predict: {failure}", file=sys.stderr)
        return 2
    if args.url:
        return predict_on_running_server(args.url, raw_inputs, args.output)
    if args.tiny:
        print(TINY_NOTE)
    return predict_on_own_server(weights, raw_inputs, args.output)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
