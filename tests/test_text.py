"""Prompt encoding against the reference: T5 for the pixel stages, CLIP for the latent stage."""

import torch

from conftest import expected
from show1.text import encode_clip, encode_t5


def test_t5_matches_reference(tiny_pipeline, reference_settings):
    c = tiny_pipeline.components
    t5 = expected("t5")
    ids = c["tokenizer"](reference_settings["prompt"].lower().strip(), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt")
    assert torch.equal(ids.input_ids, torch.from_numpy(t5["prompt_input_ids"]))
    assert torch.equal(ids.attention_mask, torch.from_numpy(t5["prompt_attention_mask"]))
    text = encode_t5(c["tokenizer"], c["text_encoder"], reference_settings["prompt"])
    assert (text.cond - torch.from_numpy(t5["prompt_embeds"])).abs().max() <= 1e-4
    assert (text.uncond - torch.from_numpy(t5["negative_prompt_embeds"])).abs().max() <= 1e-4


def test_t5_lowercases_and_strips(tiny_pipeline):
    c = tiny_pipeline.components
    a = encode_t5(c["tokenizer"], c["text_encoder"], "  A Red Car  ")
    b = encode_t5(c["tokenizer"], c["text_encoder"], "a red car")
    assert torch.equal(a.cond, b.cond)


def test_clip_matches_reference(tiny_pipeline, reference_settings):
    c = tiny_pipeline.components
    clip = expected("clip")
    ids = c["sr2_tokenizer"](reference_settings["prompt"], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(ids, torch.from_numpy(clip["prompt_input_ids"]))
    text = encode_clip(c["sr2_tokenizer"], c["sr2_text_encoder"], reference_settings["prompt"],
                       reference_settings["negative_prompt"])
    states = torch.cat([text.uncond, text.cond])
    assert (states - torch.from_numpy(clip["prompt_embeds_cfg"])).abs().max() <= 1e-4
