"""Prompt encoding: T5 for the pixel stages (once per prompt), CLIP for the latent stage."""

from dataclasses import dataclass

import torch

MAX_TOKENS = 77


@dataclass
class PromptEmbeddings:
    """Text states for classifier-free guidance: the unconditional and the conditional prompt."""

    uncond: torch.Tensor  # [1, L, D]
    cond: torch.Tensor  # [1, L, D]

    def guidance_batch(self, batch: int) -> torch.Tensor:
        """[2*batch, L, D]: `batch` unconditional rows, then `batch` conditional rows."""
        return torch.cat([self.uncond.expand(batch, -1, -1), self.cond.expand(batch, -1, -1)])

    def to(self, dtype):
        return PromptEmbeddings(self.uncond.to(dtype), self.cond.to(dtype))


def _tokenize(tokenizer, texts, device):
    tokens = tokenizer(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


@torch.no_grad()
def encode_t5(tokenizer, text_encoder, prompt: str) -> PromptEmbeddings:
    """T5 states of the prompt (lower-cased, stripped) and of the empty string, with attention masks."""
    device = text_encoder.device
    states = []
    for text in ("", prompt.lower().strip()):
        ids, mask = _tokenize(tokenizer, [text], device)
        states.append(text_encoder(ids, attention_mask=mask).last_hidden_state)
    return PromptEmbeddings(*states)


@torch.no_grad()
def encode_clip(tokenizer, text_encoder, prompt: str, negative_prompt: str) -> PromptEmbeddings:
    """CLIP last hidden states of the negative prompt and the prompt (no attention mask, as trained)."""
    device = text_encoder.device
    states = []
    for text in (negative_prompt, prompt):
        ids, _ = _tokenize(tokenizer, [text], device)
        states.append(text_encoder(ids)[0])
    return PromptEmbeddings(*states)
