"""predict.Predictor in-process, on the tiny weights: its inputs, its output files, and how it
recovers from a cancellation or a GPU out-of-memory error."""

import ast
import math
import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from cog import CancelationException, _inspector

import predict
from conftest import FAST
from show1.settings import OUTPUT_STAGES, SETTINGS
from show1.video import VIDEO_FORMATS

PREDICT_SOURCE = Path(predict.__file__).read_text()
INPUTS = _inspector.create_predictor("predict", "Predictor").inputs

# Cog input -> the engine setting it sets (the other settings keep their reference values).
ENGINE_SETTING = {
    "negative_prompt": "negative_prompt",
    "keyframe_steps": "keyframe_steps",
    "interpolation_steps": "interpolation_steps",
    "first_frame_steps": "first_frame_steps",
    "sr1_steps": "sr1_steps",
    "sr2_steps": "sr2_steps",
    "guidance_scale": "keyframe_guidance",
}


# --- the inputs: what the web form and the API are generated from -------------------------------


def test_the_inputs_are_exactly_the_published_ones_each_with_a_description():
    assert list(INPUTS) == [
        "prompt", "negative_prompt", "seed", "keyframe_steps", "interpolation_steps", "first_frame_steps",
        "sr1_steps", "sr2_steps", "guidance_scale", "fps", "output_format", "output_stage",
    ]
    for field in INPUTS.values():
        assert field.description and field.description.strip(), field.name
        bounded = field.choices or (field.ge is not None and field.le is not None)
        assert bounded or field.name in ("prompt", "negative_prompt"), f"{field.name} needs a range or choices"


def test_the_inputs_follow_the_engine_settings():
    for name, setting_name in ENGINE_SETTING.items():
        field, setting = INPUTS[name], SETTINGS[setting_name]
        assert field.default == setting.default, name
        assert field.le == setting.le, name
        if name != "sr2_steps":
            assert field.ge == setting.ge, name
    # Only strength x steps of sr2's schedule runs, and at least one step must.
    strength = SETTINGS["sr2_strength"].default
    assert INPUTS["sr2_steps"].ge == max(SETTINGS["sr2_steps"].ge, math.ceil(1 / strength))
    assert int(INPUTS["sr2_steps"].ge * strength) >= 1 > int((INPUTS["sr2_steps"].ge - 1) * strength)
    assert set(INPUTS["output_stage"].choices) == set(OUTPUT_STAGES)
    assert INPUTS["output_stage"].default == "full"
    assert INPUTS["output_format"].choices == list(VIDEO_FORMATS)
    assert INPUTS["prompt"].default is None  # required


def predict_input_calls():
    """(parameter name, {keyword: value node}) of every Input(...) in Predictor.predict."""
    module = ast.parse(PREDICT_SOURCE)
    predictor = next(node for node in module.body if isinstance(node, ast.ClassDef) and node.name == "Predictor")
    method = next(node for node in predictor.body if isinstance(node, ast.FunctionDef) and node.name == "predict")
    arguments = method.args.args[-len(method.args.defaults):]
    for argument, default in zip(arguments, method.args.defaults):
        assert isinstance(default, ast.Call) and default.func.id == "Input", argument.arg
        yield argument.arg, {keyword.arg: keyword.value for keyword in default.keywords}


def plain_literal(node):
    """The value of a literal the way `cog build`'s static parser reads it, or raise: numbers as
    written, strings without escapes or implicit concatenation, lists of those, None."""
    text = ast.get_source_segment(PREDICT_SOURCE, node)
    if isinstance(node, ast.List):
        return [plain_literal(item) for item in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        assert text[0] == text[-1] in "\"'" and "\\" not in text and text[1:-1] == node.value, text
        return node.value
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float))):
        assert node.value is None or re.fullmatch(r"\d+(\.\d+)?", text), f"{text} is not a plain number"
        return node.value
    raise AssertionError(f"{text} is not a literal that `cog build` can read")


def test_the_inputs_are_literals_that_cog_build_reads_without_running_the_code():
    # `cog build` parses predict.py statically: a computed default would silently make an input
    # required, a computed range would silently vanish and computed choices fail the build.
    for name, keywords in predict_input_calls():
        literals = {keyword: plain_literal(value) for keyword, value in keywords.items()}
        field = INPUTS[name]
        assert literals.get("default") == field.default, name
        assert literals.get("ge") == field.ge and literals.get("le") == field.le, name
        assert literals.get("choices") == field.choices, name
        assert literals["description"] == field.description, name


# --- setup ---------------------------------------------------------------------------------


def test_weights_come_from_beside_predict_py_unless_show1_weights_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("SHOW1_WEIGHTS", raising=False)
    assert predict.weights_dir() == Path(predict.__file__).resolve().parent / "weights"
    monkeypatch.setenv("SHOW1_WEIGHTS", str(tmp_path))
    assert predict.weights_dir() == tmp_path


def test_half_precision_on_a_gpu_full_precision_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert predict.device_and_dtype() == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert predict.device_and_dtype() == ("cuda", None)  # each network's serving dtype


def test_the_serving_precision_is_float16_for_every_network():
    from show1.components import NETWORKS

    assert len(NETWORKS) == 8 and {network.serving_dtype for network in NETWORKS} == {torch.float16}


# Total memory as torch reports it on Replicate's GPUs (GiB) -> the plan predict.py picks.
GPU_PLANS = {14.7: "low_memory", 22.0: "low_memory", 39.6: "resident", 44.4: "resident", 79.2: "resident"}


def test_each_gpu_gets_the_fastest_plan_its_memory_holds_unless_told(monkeypatch):
    monkeypatch.delenv("SHOW1_LOW_MEMORY", raising=False)
    assert predict.execution_plan("cpu").name == "resident"
    for total_gib, expected in GPU_PLANS.items():
        properties = type("Properties", (), {"total_memory": int(total_gib * 2**30)})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=properties: p)
        assert predict.execution_plan("cuda").name == expected, total_gib
    monkeypatch.setenv("SHOW1_LOW_MEMORY", "0")
    assert predict.execution_plan("cuda").name == "resident"
    monkeypatch.setenv("SHOW1_LOW_MEMORY", "1")
    assert predict.execution_plan("cpu").name == "low_memory"
    monkeypatch.setenv("SHOW1_LOW_MEMORY", "yes please")
    with pytest.raises(ValueError, match="SHOW1_LOW_MEMORY must be 0 or 1"):
        predict.execution_plan("cuda")


def test_setup_names_what_is_missing_and_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOW1_WEIGHTS", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"absent.*script/download-weights"):
        predict.Predictor().setup()


# --- predictions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_weights):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHOW1_WEIGHTS", str(tiny_weights))
        instance = predict.Predictor()
        instance.setup()
    yield instance
    shutil.rmtree(instance.output_dir)


def run(predictor, **inputs):
    """predict() with every input given, as the server calls it (the defaults are Input objects)."""
    values = {"prompt": "a cat", "output_stage": "keyframes", **FAST, **inputs}
    return predictor.predict(**_inspector.check_input(INPUTS, values))


def test_each_prediction_writes_a_new_file_and_removes_the_previous_one(predictor):
    first = run(predictor, prompt="../evil name", output_format="gif")
    second = run(predictor)

    for output in (first, second):
        assert output.parent == predictor.output_dir
        assert re.fullmatch(r"show1-[0-9a-f]{32}\.(mp4|gif)", output.name)
    assert first.suffix == ".gif" and second.suffix == ".mp4"
    assert list(predictor.output_dir.iterdir()) == [second]


class FailingPipeline:
    """The real pipeline, with `error` raised as soon as `stage` has finished: where a GPU
    out-of-memory error or a cancellation would surface in the middle of the cascade."""

    def __init__(self, pipe, stage, error):
        self.pipe, self.stage, self.error = pipe, stage, error

    def __call__(self, prompt, on_stage_end, **settings):
        def end_of_stage(stage, seconds):
            on_stage_end(stage, seconds)
            if stage == self.stage:
                raise self.error

        return self.pipe(prompt, on_stage_end=end_of_stage, **settings)


@pytest.fixture
def released(monkeypatch):
    """The errors that predict.release_memory was called with."""
    calls = []
    release = predict.release_memory
    monkeypatch.setattr(predict, "release_memory", lambda error: (calls.append(error), release(error)))
    return calls


def test_out_of_memory_frees_memory_explains_what_to_do_and_the_next_prediction_works(predictor, monkeypatch, released):
    run(predictor)  # leaves an output behind
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(predictor, "pipe", FailingPipeline(predictor.pipe, "keyframes", out_of_memory))

    with pytest.raises(RuntimeError) as raised:
        run(predictor, output_stage="interpolated")
    message = str(raised.value)
    assert "out of memory after stage keyframes" in message
    assert "output_stage" in message and "next prediction" in message
    assert released == [out_of_memory]
    assert list(predictor.output_dir.iterdir()) == []

    monkeypatch.undo()
    assert run(predictor).is_file()


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_out_of_memory_inside_a_stage_names_that_stage_and_logs_the_allocators_words(
        predictor, monkeypatch, released, capsys, error):
    unet = predictor.pipe.components.interpolation.unet

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(unet, "forward", out_of_memory)
    with pytest.raises(RuntimeError) as raised:
        run(predictor, output_stage="interpolated")
    assert raised.value is not error
    assert "The GPU ran out of memory in stage interpolation" in str(raised.value)
    assert f"GPU out of memory in stage interpolation: {error}" in capsys.readouterr().out
    assert released == [error]

    monkeypatch.undo()
    assert run(predictor).is_file()


def test_a_cancellation_removes_partial_output_frees_memory_and_is_passed_on(predictor, monkeypatch, released, capsys):
    cancellation = CancelationException()
    monkeypatch.setattr(predictor, "pipe", FailingPipeline(predictor.pipe, "keyframes", cancellation))

    with pytest.raises(CancelationException):
        run(predictor, output_stage="interpolated")
    assert released == [cancellation]
    assert list(predictor.output_dir.iterdir()) == []
    assert "Cancelled after stages: text, keyframes" in capsys.readouterr().out

    monkeypatch.undo()
    assert run(predictor).is_file()


def test_release_memory_drops_the_tensors_an_interrupted_call_still_holds():
    held = []

    def interrupted_stage():
        activations = torch.zeros(1024)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("simulated")

    try:
        interrupted_stage()
    except torch.OutOfMemoryError as error:
        assert held[0]() is not None, "the traceback keeps the stage's tensors alive"
        predict.release_memory(error)
        assert held[0]() is None


def test_a_removed_output_folder_is_recreated(predictor):
    shutil.rmtree(predictor.output_dir)
    assert run(predictor).parent == predictor.output_dir


def test_an_unchecked_output_format_never_becomes_part_of_a_path(predictor):
    # Without the schema file the server passes inputs through unchecked: predict() must hold.
    values = _inspector.check_input(INPUTS, {"prompt": "a cat", "output_stage": "keyframes", **FAST})
    with pytest.raises(ValueError, match="output_format"):
        predictor.predict(**{**values, "output_format": "mp4/../../escaped"})
    assert list(predictor.output_dir.iterdir()) == []
    assert not list(predictor.output_dir.parent.glob("escaped*"))
