"""Networks with random weights and stand-in tokenizers, built from configs: for the tiny test
weights (script/make-tiny-weights) and for benchmarks at the published size (show1.benchmark).
Nothing here is downloaded, and nothing here is a usable model.
"""

import io
import json
import math

import sentencepiece
import torch
import transformers

from .loading import KNOWN_CLASSES

# Spread of the random parameters: norms stay near the identity and every other layer gets a
# fan-in scaled spread, bounded so small layers do not blow up and large ones do not vanish.
NORM_WEIGHT_STD = 0.1
NORM_BIAS_STD = 0.05
BIAS_STD = 0.02
WEIGHT_STD_RANGE = (0.02, 0.2)

END_OF_WORD = "</w>"


def write_json(path, data):
    """JSON as diffusers and transformers write it (sorted keys, 2-space indent)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# Networks


def build_network(class_name, config):
    """A network of the class a model_index.json names, built at `config` (default initialisation,
    on the current default device)."""
    cls = KNOWN_CLASSES[tuple(class_name)]
    if issubclass(cls, transformers.PreTrainedModel):
        return cls(cls.config_class.from_dict(config))
    return cls.from_config(config)


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
