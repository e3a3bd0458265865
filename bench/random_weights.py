"""Components with random weights and stand-in tokenizers, built from configs: for the tiny test
weights (script/make-tiny-weights), for benchmarks and memory predictions at the published size
(bench/cascade.py, bench/fake_memory.py) and for weights folders written from memory
(bench/weights_folder.py). Nothing here is downloaded, and nothing here is a usable model.

The data lives in bench/configs: `published.json` holds each network's config at its published
size; `tiny.json` holds, per repo, its model_index.json and for each folder what it is made from
(a network's config and stored dtype, a scheduler's config, a tokenizer's material), following the
published repos folder by folder.
"""

import io
import json
import math
import tempfile
from pathlib import Path

import sentencepiece
import torch
import transformers
from safetensors.torch import save_file

from show1.components import COMPONENTS, DIFFUSERS_MODEL, TRANSFORMERS_MODEL, Components
from show1.precision import cast_as_loaded
from show1.weights.layout import index_file_name, weights_file_name
from show1.weights.loading import KNOWN_CLASSES, build_network, scheduler_from_config
from show1.weights.preparation.conversion import standalone_tensors

CONFIGS = Path(__file__).resolve().parent / "configs"
SIZES = ("published", "tiny")

# Spread of the random parameters: norms stay near the identity and every other layer gets a
# fan-in scaled spread, bounded so small layers do not blow up and large ones do not vanish.
NORM_WEIGHT_STD = 0.1
NORM_BIAS_STD = 0.05
BIAS_STD = 0.02
WEIGHT_STD_RANGE = (0.02, 0.2)

END_OF_WORD = "</w>"


# The data


def tiny_repos() -> dict:
    """Per repo of the tiny weights: its model_index.json and what each folder is made from."""
    return json.loads((CONFIGS / "tiny.json").read_text(encoding="utf-8"))["repos"]


def published_configs() -> dict:
    """{repo: {folder: config}} of every network at its published size."""
    return json.loads((CONFIGS / "published.json").read_text(encoding="utf-8"))


def network_config(repos, repo, folder, size):
    """The config of the network in repo/folder at `size`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "published":
        return published_configs()[repo][folder]
    return repos[repo]["folders"][folder]["config"]


def folder_class(repos, repo, folder):
    """The class repo/model_index.json names for `folder`, mapped to this project."""
    return KNOWN_CLASSES[tuple(repos[repo]["model_index"][folder])]


# Networks


def fan_in_std(shape):
    fan_in = math.prod(shape[1:])
    low, high = WEIGHT_STD_RANGE
    return min(max(fan_in**-0.5, low), high)


def random_parameter(module, name, shape, generator):
    """Random values for one parameter. Nothing is zero, so layers that default initialisation
    leaves at zero (temporal conv outputs, attention output projections) still shape the output."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if isinstance(module, torch.nn.Embedding):
        return noise
    if "Norm" in type(module).__name__:
        return 1 + NORM_WEIGHT_STD * noise if name == "weight" else NORM_BIAS_STD * noise
    if len(shape) >= 2:
        return fan_in_std(shape) * noise
    return BIAS_STD * noise


@torch.no_grad()
def randomise(model, generator):
    """Overwrites every parameter with random values that float16 represents exactly. Parameters
    are drawn in module order, so the generator's state decides every value."""
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            parameter.copy_(random_parameter(module, name, parameter.shape, generator).half())


def random_network(cls, config, device, dtype, generator):
    """A `cls` network built at `config` on `device` (no copy from the CPU; "meta" allocates
    nothing), in the dtypes it has when loaded in `dtype`, with random weights, in eval mode."""
    with torch.device(device):
        network = build_network(cls, config)
    cast_as_loaded(network, dtype)
    if device != "meta":
        randomise(network, generator)
    return network.eval()


def random_component(component, repos, size, device, dtype, generator, tokenizer_dir):
    """One component the pipeline reads (show1.components): a network at `size` with random
    weights, a scheduler from its config, or a stand-in tokenizer written to `tokenizer_dir`."""
    cls = folder_class(repos, component.repo, component.folder)
    entry = repos[component.repo]["folders"][component.folder]
    if component.is_network:
        config = network_config(repos, component.repo, component.folder, size)
        return random_network(cls, config, device, dtype, generator)
    if component.kind.name == "scheduler":
        return scheduler_from_config(cls, entry["config"])
    folder = Path(tokenizer_dir) / component.key
    folder.mkdir(parents=True)
    write_tokenizer(folder, cls, repos[component.repo], component.folder)
    return cls.from_pretrained(folder)


def random_components(size, device, dtype, seed=0, networks_only=False) -> Components:
    """Every component the pipeline reads, networks at `size` with random weights (on "meta":
    shapes only); with networks_only, the networks alone."""
    repos = tiny_repos()
    wanted = [c for c in COMPONENTS if c.is_network or not networks_only]
    generator = torch.Generator("cpu" if device == "meta" else device).manual_seed(seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        return Components({
            c: random_component(c, repos, size, device, dtype, generator, tokenizer_dir) for c in wanted
        })


# Tokenizers


def with_extra_ids(tokens, extra_ids):
    """T5's sentinel tokens <extra_id_N>, listed as additional special tokens."""
    return {**tokens, "additional_special_tokens": [f"<extra_id_{i}>" for i in range(extra_ids)]}


def train_sentencepiece(sentences, pieces) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos) and exactly
    `pieces` pieces (training fails if the sentences are too few). One thread and unshuffled input
    make training deterministic."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=pieces,
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    return model.getvalue()


def write_t5_tokenizer(folder, entry, text_encoder_config):
    """spiece.model trained on the entry's sentences, and the configs that name T5's special tokens."""
    extra_ids = entry["tokenizer_config"]["extra_ids"]
    if entry["pieces"] + extra_ids > text_encoder_config["vocab_size"]:
        raise ValueError("The T5 tokenizer has more ids than the text encoder's vocab_size")
    (folder / "spiece.model").write_bytes(train_sentencepiece(entry["training_sentences"], entry["pieces"]))
    write_json(folder / "tokenizer_config.json", with_extra_ids(entry["tokenizer_config"], extra_ids))
    write_json(folder / "special_tokens_map.json", with_extra_ids(entry["special_tokens_map"], extra_ids))


def byte_symbols():
    """The 256 characters that stand for bytes in byte-level BPE, in vocabulary order: printable
    Latin-1 bytes are themselves, the other bytes take code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def word_merges(words):
    """BPE merges that build each word from its letters, left to right, each merge once in order
    of first use; the last letter carries the end-of-word mark as in CLIP's vocabulary."""
    merges = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        merged = symbols[0]
        for symbol in symbols[1:]:
            merges.setdefault((merged, symbol), None)
            merged += symbol
    return list(merges)


def write_clip_tokenizer(folder, entry, text_encoder_config):
    """vocab.json and merges.txt of a byte-level BPE that knows the entry's words, and its configs."""
    merges = word_merges(entry["merge_words"])
    special = [entry["special_tokens_map"][key]["content"] for key in ("bos_token", "eos_token")]
    symbols = byte_symbols()
    # Ids in CLIP's order. The published text encoder config (eos_token_id 2) makes CLIP pool at the
    # highest id of a sequence, so end-of-text has to be the highest id.
    vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + special
    if len(vocab) != text_encoder_config["vocab_size"]:
        raise ValueError(f"The CLIP tokenizer has {len(vocab)} tokens, the text encoder's vocab_size is "
                         f"{text_encoder_config['vocab_size']}")
    write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)})
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    write_json(folder / "tokenizer_config.json", entry["tokenizer_config"])
    write_json(folder / "special_tokens_map.json", entry["special_tokens_map"])


TOKENIZER_WRITERS = {"T5Tokenizer": write_t5_tokenizer, "CLIPTokenizer": write_clip_tokenizer}


def write_tokenizer(folder, cls, spec, name):
    """The files of a stand-in tokenizer of class `cls` (slow or fast: both read the slow files),
    made from folder `name` of a repo's tiny.json `spec`, to fit the repo's text encoder."""
    writer = TOKENIZER_WRITERS[cls.__name__.removesuffix("Fast")]
    writer(folder, spec["folders"][name], spec["folders"]["text_encoder"]["config"])


# Folders in the published layout


def write_json(path, data):
    """JSON as diffusers and transformers write it (sorted keys, 2-space indent)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def network_kind(cls):
    """The show1.components Kind of a network class: which library's file names it has."""
    return TRANSFORMERS_MODEL if issubclass(cls, transformers.PreTrainedModel) else DIFFUSERS_MODEL


def save_tensors(path, tensors):
    tensors = standalone_tensors(tensors)
    if path.suffix == ".safetensors":
        save_file(tensors, path, metadata={"format": "pt"})  # transformers requires the format tag
    else:
        torch.save(tensors, path)


def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


def split_into_shards(tensors, count):
    """`count` groups of consecutive tensors of about equal size, as sharded checkpoints are cut."""
    total = sum(tensor_bytes(t) for t in tensors.values())
    shards = [{} for _ in range(count)]
    written = 0
    for key, tensor in tensors.items():
        shards[min(written * count // total, count - 1)][key] = tensor
        written += tensor_bytes(tensor)
    return shards


def write_weights(folder, kind, tensors, file_format="safetensors", shards=1, variant=None):
    """A network's tensors named as its library names them (show1.weights.layout): one file, or
    `shards` files and the index naming the file of every tensor."""
    if shards == 1:
        save_tensors(folder / weights_file_name(kind, file_format, variant=variant), tensors)
        return
    weight_map = {}
    for number, shard in enumerate(split_into_shards(tensors, shards), start=1):
        name = weights_file_name(kind, file_format, number, shards)
        save_tensors(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(tensor_bytes(t) for t in tensors.values())}, "weight_map": weight_map}
    write_json(folder / index_file_name(kind, file_format), index)


def write_folder(folder, cls, spec, name, config=None, tensors=None, **weights_options):
    """Folder `name` of a repo's tiny.json `spec`, of class `cls`: a scheduler's config, a stand-in
    tokenizer, or a network's `config` (default the entry's) and `tensors` (with write_weights'
    options)."""
    entry = spec["folders"][name]
    folder.mkdir(parents=True, exist_ok=True)
    if cls.__name__.endswith("Scheduler"):
        write_json(folder / "scheduler_config.json", entry["config"])
    elif cls.__name__.removesuffix("Fast") in TOKENIZER_WRITERS:
        write_tokenizer(folder, cls, spec, name)
    else:
        write_json(folder / "config.json", config or entry["config"])
        write_weights(folder, network_kind(cls), tensors, **weights_options)


def write_model_indexes(weights_dir, repos):
    for repo, spec in repos.items():
        (weights_dir / repo).mkdir(parents=True, exist_ok=True)
        write_json(weights_dir / repo / "model_index.json", spec["model_index"])
