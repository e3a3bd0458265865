"""A weights folder in the published layout (show1.components) made from networks in memory, so the
setup a server pays (Show1Pipeline.from_pretrained) can be timed without downloading anything.

The networks' tensors are written as they are, in the dtypes they run in, one safetensors file per
network; model_index.json files, scheduler configs and stand-in tokenizers come from the same data
as the tiny test weights (bench/configs/tiny.json).
"""

from pathlib import Path

from show1.components import COMPONENTS

from .random_weights import folder_class, network_config, tiny_repos, write_folder, write_model_indexes


def host_copies(network) -> dict:
    """The network's tensors, each copied to the CPU."""
    return {name: t.detach().to("cpu", copy=True) for name, t in network.state_dict().items()}


def write_weights_folder(components, size, folder) -> Path:
    """Writes every component the pipeline reads into `folder`; networks come from `components`
    (show1.components.Components), built at `size`."""
    folder = Path(folder)
    repos = tiny_repos()
    write_model_indexes(folder, repos)
    for component in COMPONENTS:
        spec = repos[component.repo]
        target = folder / component.repo / component.folder
        cls = folder_class(repos, component.repo, component.folder)
        if component.is_network:
            config = network_config(repos, component.repo, component.folder, size)
            tensors = host_copies(components[component.key])
            write_folder(target, cls, spec, component.folder, config=config, tensors=tensors)
        else:
            write_folder(target, cls, spec, component.folder)
    return folder
