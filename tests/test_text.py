"""Prompt encoding against the reference: T5 for the pixel stages, CLIP for the latent stage."""

import torch

from conftest import expected
from show1.stages.text import encode_clip, encode_t5


def test_t5_matches_reference(tiny_pipeline, reference_settings):
    c = tiny_pipeline.components.text
    t5 = expected("t5")
    ids = c.t5_tokenizer(reference_settings["prompt"].lower().strip(), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt")
    assert torch.equal(ids.input_ids, torch.from_numpy(t5["prompt_input_ids"]))
    assert torch.equal(ids.attention_mask, torch.from_numpy(t5["prompt_attention_mask"]))
    text = encode_t5(c.t5_tokenizer, c.t5, reference_settings["prompt"])
    assert (text.cond - torch.from_numpy(t5["prompt_embeds"])).abs().max() <= 1e-4
    assert (text.uncond - torch.from_numpy(t5["negative_prompt_embeds"])).abs().max() <= 1e-4


def test_t5_lowercases_and_strips(tiny_pipeline):
    c = tiny_pipeline.components.text
    a = encode_t5(c.t5_tokenizer, c.t5, "  A Red Car  ")
    b = encode_t5(c.t5_tokenizer, c.t5, "a red car")
    assert torch.equal(a.cond, b.cond)


def test_clip_matches_reference(tiny_pipeline, reference_settings):
    c = tiny_pipeline.components.text
    clip = expected("clip")
    ids = c.clip_tokenizer(reference_settings["prompt"], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(ids, torch.from_numpy(clip["prompt_input_ids"]))
    text = encode_clip(c.clip_tokenizer, c.clip, reference_settings["prompt"],
                       reference_settings["negative_prompt"])
    states = torch.cat([text.uncond, text.cond])
    assert (states - torch.from_numpy(clip["prompt_embeds_cfg"])).abs().max() <= 1e-4


LONG_PROMPT = "a red panda eating bamboo on a sunny day in a green forest, " * 12


def tokens_beyond_77(tokenizer, text):
    return len(tokenizer(text).input_ids) - 77


def test_a_prompt_longer_than_77_tokens_is_cut_and_the_cut_is_logged(tiny_pipeline, capsys):
    c = tiny_pipeline.components.text
    dropped = {
        "T5": tokens_beyond_77(c.t5_tokenizer, LONG_PROMPT.lower().strip()),
        "CLIP": tokens_beyond_77(c.clip_tokenizer, LONG_PROMPT),
    }
    assert min(dropped.values()) > 0

    t5 = encode_t5(c.t5_tokenizer, c.t5, LONG_PROMPT)
    clip = encode_clip(c.clip_tokenizer, c.clip, LONG_PROMPT, "blur")
    lines = capsys.readouterr().out.splitlines()

    assert lines == [
        f"The prompt is too long for T5: {dropped['T5']} of its tokens beyond the first 77 were dropped, "
        "so its last words do not steer the video.",
        f"The prompt is too long for CLIP: {dropped['CLIP']} of its tokens beyond the first 77 were dropped, "
        "so its last words do not steer the video.",
    ]
    # Still cut, not refused: the states have the 77 positions the networks were trained on.
    assert t5.cond.shape[1] == clip.cond.shape[1] == 77


def test_a_long_negative_prompt_is_named_as_such(tiny_pipeline, capsys):
    c = tiny_pipeline.components.text
    encode_clip(c.clip_tokenizer, c.clip, "a cat", LONG_PROMPT)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("The negative prompt is too long for CLIP: ")


def test_prompts_that_fit_log_nothing(tiny_pipeline, capsys):
    c = tiny_pipeline.components.text
    encode_t5(c.t5_tokenizer, c.t5, "a red car")
    encode_clip(c.clip_tokenizer, c.clip, "a red car", "low resolution, blur")
    assert capsys.readouterr().out == ""
