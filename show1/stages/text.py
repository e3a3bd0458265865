"""Stage `text`: the prompt encoded once per video, by T5 for the pixel stages (keyframes to sr1)
and by CLIP for the latent stage (sr2)."""

from dataclasses import dataclass
from typing import Optional

import torch

MAX_TOKENS = 77


@dataclass
class PromptEmbeddings:
    """Text states for classifier-free guidance (show1.sampling.guided_denoise): the unconditional
    and the conditional prompt."""

    uncond: torch.Tensor  # [1, L, D]
    cond: torch.Tensor  # [1, L, D]


@dataclass
class TextStates:
    t5: PromptEmbeddings
    clip: Optional[PromptEmbeddings]  # None when the video stops before sr2


def _tokenize(tokenizer, texts, device, encoder="text encoder", role="prompt"):
    """Token ids and attention mask, padded and cut to MAX_TOKENS as the networks were trained.
    The tokenizer cuts silently, so the cut is logged here: a user whose long prompt loses its end
    should be told that the video ignores it."""
    for text in texts:
        dropped = _tokens_beyond_limit(tokenizer, text)
        if dropped:
            # print, not logging: Cog puts a prediction's printed lines in its logs.
            print(
                f"The {role} is too long for {encoder}: {dropped} of its tokens beyond the first "
                f"{MAX_TOKENS} were dropped, so its last words do not steer the video."
            )
    tokens = tokenizer(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _tokens_beyond_limit(tokenizer, text) -> int:
    """How many tokens of text (special tokens included) do not fit in MAX_TOKENS."""
    # verbose=False: the tokenizer's own warning about long sequences would be misleading, since
    # the real call truncates.
    length = len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids)
    return max(0, length - MAX_TOKENS)


@torch.no_grad()
def encode_t5(tokenizer, text_encoder, prompt: str) -> PromptEmbeddings:
    """T5 states of the prompt (lower-cased, stripped) and of the empty string, with attention masks."""
    device = text_encoder.device
    states = []
    for text in ("", prompt.lower().strip()):
        ids, mask = _tokenize(tokenizer, [text], device, encoder="T5")
        states.append(text_encoder(ids, attention_mask=mask).last_hidden_state)
    return PromptEmbeddings(*states)


@torch.no_grad()
def encode_clip(tokenizer, text_encoder, prompt: str, negative_prompt: str) -> PromptEmbeddings:
    """CLIP last hidden states of the negative prompt and the prompt (no attention mask, as trained)."""
    device = text_encoder.device
    states = []
    for role, text in (("negative prompt", negative_prompt), ("prompt", prompt)):
        ids, _ = _tokenize(tokenizer, [text], device, encoder="CLIP", role=role)
        states.append(text_encoder(ids)[0])
    return PromptEmbeddings(*states)


def run(parts, prompt: str, negative_prompt: str, clip: bool = True) -> TextStates:
    """parts: the stage's components (t5, t5_tokenizer, clip, clip_tokenizer). CLIP runs only when
    `clip` (the video goes as far as sr2)."""
    t5 = encode_t5(parts.t5_tokenizer, parts.t5, prompt)
    if not clip:
        return TextStates(t5, None)
    return TextStates(t5, encode_clip(parts.clip_tokenizer, parts.clip, prompt, negative_prompt))
