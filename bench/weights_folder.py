"""A weights folder in the published layout (show1.weights) made from networks in memory, so the
setup a server pays (Show1Pipeline.from_pretrained) can be timed without downloading anything.

The networks' tensors are written as they are, in the dtypes they run in, one safetensors file per
network; model_index.json files, scheduler configs and stand-in tokenizers come from the same data
as the tiny test weights (show1/configs/tiny.json), the network configs from the size's configs.
"""

from pathlib import Path

from safetensors.torch import save_file

from show1.benchmark import network_configs, tiny_repos
from show1.random_weights import TOKENIZER_WRITERS, write_json
from show1.weights import COMPONENTS


def host_copies(network) -> dict:
    """The network's tensors, each copied to the CPU with its own storage (safetensors refuses
    tensors that share memory, such as T5's tied embeddings)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in network.state_dict().items()}


def write_network(folder, component, config, network):
    write_json(folder / "config.json", config)
    # transformers refuses safetensors files without the format tag.
    save_file(host_copies(network), folder / f"{component.weights_stem}.safetensors", metadata={"format": "pt"})


def write_weights_folder(components, size, folder) -> Path:
    """Writes every component the pipeline reads into `folder`; networks come from `components`."""
    folder = Path(folder)
    repos = tiny_repos()
    configs = network_configs(size, repos)
    for repo, spec in repos.items():
        (folder / repo).mkdir(parents=True, exist_ok=True)
        write_json(folder / repo / "model_index.json", spec["model_index"])
    for key, component in COMPONENTS.items():
        spec = repos[component.repo]
        entry = spec["folders"][component.folder]
        class_name = spec["model_index"][component.folder][1]
        target = component.path(folder)
        target.mkdir(parents=True, exist_ok=True)
        if component.weights_stem:
            write_network(target, component, configs[component.repo][component.folder], components[key])
        elif class_name in TOKENIZER_WRITERS:
            TOKENIZER_WRITERS[class_name](target, entry, spec["folders"]["text_encoder"]["config"])
        else:
            write_json(target / "scheduler_config.json", entry["config"])
    return folder
