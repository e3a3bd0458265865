"""show1.components: one declaration per component, from which the rest of the project derives, and
one id per stage."""

import ast
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REFERENCE_WEIGHTS
from show1.components import COMPONENTS, NETWORKS, STAGES, Components, component
from show1.settings import OUTPUT_STAGES
from show1.weights.layout import component_dir, required_files

ROOT = Path(__file__).resolve().parent.parent


def test_each_component_has_one_folder_one_name_and_a_stage():
    assert len({(c.repo, c.folder) for c in COMPONENTS}) == len(COMPONENTS)
    assert len({c.key for c in COMPONENTS}) == len(COMPONENTS)
    assert {c.stage for c in COMPONENTS} == set(STAGES)
    assert all(c.serving_dtype is not None for c in NETWORKS)
    assert all(c.serving_dtype is None for c in COMPONENTS if not c.is_network)


def test_a_component_is_found_by_its_name_and_an_unknown_name_lists_the_names():
    assert component("sr1.noising_scheduler").folder == "image_noising_scheduler"
    with pytest.raises(ValueError, match="sr1.unet"):
        component("sr3.unet")


def test_the_files_the_loader_reads_come_from_every_declared_folder():
    read_folders = {path.parent for path in required_files(REFERENCE_WEIGHTS) if path.name != "model_index.json"}
    assert read_folders == {component_dir(REFERENCE_WEIGHTS, c) for c in COMPONENTS}


def test_loaded_components_are_named_by_stage():
    loaded = {c: f"object of {c.key}" for c in COMPONENTS}
    components = Components(loaded)
    assert components.sr1.noising_scheduler == "object of sr1.noising_scheduler"
    assert components.text.clip == components["text.clip"] == "object of text.clip"
    assert vars(components.keyframes) == {"unet": "object of keyframes.unet", "scheduler": "object of keyframes.scheduler"}
    assert components.networks("sr2") == ["object of sr2.unet", "object of sr2.vae"]
    assert len(components.networks()) == len(NETWORKS)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_id_names_its_module_and_its_run_function(stage):
    module = importlib.import_module(f"show1.stages.{stage}")
    assert callable(module.run)
    assert f"Stage `{stage}`" in module.__doc__


def test_the_pipeline_runs_each_stage_module_under_its_own_id():
    """In show1/pipeline.py every stage's `run` is called under the stage's own id."""
    tree = ast.parse((ROOT / "show1" / "pipeline.py").read_text())
    calls = [
        (node.args[0].value, node.args[1].value.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run" and len(node.args) >= 2
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[1], ast.Attribute)
    ]
    assert calls and all(stage == module for stage, module in calls)
    assert {stage for stage, _ in calls} == set(STAGES) - {"text"}


def test_every_output_stage_ends_at_a_stage_and_the_pipeline_output_is_named_by_stage():
    from show1.pipeline import Show1Output

    assert set(OUTPUT_STAGES.values()) <= set(STAGES)
    assert OUTPUT_STAGES["full"] == STAGES[-1]
    intermediate = {name for name in Show1Output.__dataclass_fields__} - {"frames", "timings"}
    assert intermediate == set(STAGES[1:-1])


def imports_of(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_models_import_nothing_from_the_loader():
    """No import circle: the loader builds the models, never the other way round."""
    paths = list((ROOT / "show1" / "models").glob("*.py"))
    assert len(paths) == 3
    for path in paths:
        # show1.attention (the padded-heads processors) imports only torch and diffusers.
        assert imports_of(path) <= {".blocks", ".unet3d", "..attention", "dataclasses", "typing", "torch"} | {
            name for name in imports_of(path) if name.startswith(("diffusers", "torch"))
        }, path


def test_the_engine_imports_no_tooling():
    """bench/ (random weights, stand-in tokenizers, configs, benchmarks) is not in the image."""
    for path in (ROOT / "show1").rglob("*.py"):
        assert not [name for name in imports_of(path) if name.split(".")[0] in ("bench", "tests")], path
    assert not list((ROOT / "show1").rglob("*.json"))


def test_stage_parts_are_plain_namespaces():
    parts = Components({c: c.name for c in COMPONENTS}).first_frame
    assert isinstance(parts, SimpleNamespace)
    assert set(vars(parts)) == {"unet", "scheduler", "noising_scheduler"}
