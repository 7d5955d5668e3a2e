"""Text conditioning against the original: prompt cleaning, special tokens per chunk, null captions.

The cases of `<reference>/text/cases/` (the full set or the in-repository subset, `reference_data.py`) are discovered and checked exactly (atol 0)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusers_magi import MagiTransformer3DModel
from diffusers_magi.conversion.transformer import load_special_tokens
from diffusers_magi.models.transformer_magi import SPECIAL_TOKEN_NAMES
from diffusers_magi.pipelines.text_conditioning_magi import (
    chunk_caption_rows,
    clean_prompt,
    negative_caption_rows,
    resolve_chunk_prompts,
)

from .conftest import FULL_REFERENCE, REFERENCE_DIR, REPO_ROOT
from .reference_cases import ENV_FLAG_TO_SPECIAL_TOKEN

TEXT_DIR = REFERENCE_DIR / "text"
TEXT_CASES = sorted(
    path.parent.name
    for path in (TEXT_DIR / "cases").glob("*/case.json")
    if "env_flags_set_to_1" in json.loads(path.read_text())
) if TEXT_DIR.is_dir() else []
ORIGINAL_TOKEN_NAMES = {
    "CAPTION_TOKEN": "caption",
    "LOGO_TOKEN": "logo",
    "TRANS_TOKEN": "trans",
    "HQ_TOKEN": "hq",
    "STATIC_FIRST_FRAMES_TOKEN": "static_first_frames",
    "DYNAMIC_FIRST_FRAMES_TOKEN": "dynamic_first_frames",
    "BORDERNESS_TOKEN": "borderness",
    "THREE_D_MODEL_TOKEN": "three_d_model",
    "TWO_D_ANIME_TOKEN": "two_d_anime",
    **{f"DURATION_TOKEN_{k}": f"duration_{k}" for k in range(1, 9)},
}


def _conditioning_model(null_caption_embedding: torch.Tensor) -> MagiTransformer3DModel:
    """A transformer without layers that holds the tiny special-token table and the case's null caption."""
    length, channels = null_caption_embedding.shape
    model = MagiTransformer3DModel(
        num_layers=0,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_head_dim=16,
        ffn_dim=32,
        text_dim=channels,
        text_length=length,
        condition_dim=8,
        cross_attention_dim=32,
    )
    with torch.no_grad():
        model.caption_tokens.special_tokens.copy_(load_special_tokens(str(TEXT_DIR / "tiny_special_tokens.npz")))
        model.caption_tokens.null_caption_embedding.copy_(null_caption_embedding)
    return model


def test_text_cases_are_found(reference_dir):
    assert "text_t2v_pad_hq_duration_4chunks" in TEXT_CASES
    if FULL_REFERENCE:  # the case without special tokens is in the full set only
        assert "text_t2v_no_flags_4chunks" in TEXT_CASES


def test_special_token_constants(reference_dir):
    expected = load_file(str(TEXT_DIR / "cases" / "text_special_token_constants" / "outputs.safetensors"))
    tokens = load_special_tokens(str(TEXT_DIR / "tiny_special_tokens.npz"))
    assert set(expected) == set(ORIGINAL_TOKEN_NAMES)
    for original_name, name in ORIGINAL_TOKEN_NAMES.items():
        assert torch.equal(tokens[SPECIAL_TOKEN_NAMES.index(name)], expected[original_name].reshape(-1)), name


@pytest.mark.parametrize("name", TEXT_CASES)
def test_text_case(reference_dir, name):
    folder = TEXT_DIR / "cases" / name
    description = json.loads((folder / "case.json").read_text())
    inputs, outputs = load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "outputs.safetensors"))
    model = _conditioning_model(inputs["null_caption_embedding"])
    flags = [ENV_FLAG_TO_SPECIAL_TOKEN[flag] for flag in description["env_flags_set_to_1"] if flag in ENV_FLAG_TO_SPECIAL_TOKEN]
    negative_tokens = "NEG_PROMPT" in description["env_flags_set_to_1"]
    generated, clean = description["denoise_chunk_num"], description["clean_chunk_num"]
    caption, mask = inputs["caption_embs"], inputs["emb_masks"]  # (1, 1, L, C), (1, L)

    # pad_special_token on the caption repeated for the generated chunks.
    embeds, masks = chunk_caption_rows(
        model.caption_tokens(), caption.repeat(1, generated, 1, 1), mask[:, None].repeat(1, generated, 1), flags
    )
    assert torch.equal(embeds, outputs["pad_special_token.caption_embs"])
    assert masks.dtype == outputs["pad_special_token.emb_masks"].dtype
    assert torch.equal(masks, outputs["pad_special_token.emb_masks"])

    # _process_txt_embeddings: the generated rows (the rows of clean prefix chunks are never read by the sampler:
    # prefix chunks are stored with the null caption and never denoised, so they have no counterpart here).
    assert torch.equal(embeds, outputs["_process_txt_embeddings.caption_embs"][:, clean:])
    assert torch.equal(masks, outputs["_process_txt_embeddings.emb_masks"][:, clean:])

    # _process_null_embeddings: the unconditional caption of every chunk.
    null_embeds, null_mask = negative_caption_rows(model.caption_tokens(), 1, negative_tokens)
    expected_null = outputs["_process_null_embeddings.null_embs"]
    assert torch.equal(null_embeds[:, None].expand_as(expected_null), expected_null)
    expected_null_mask = outputs["_process_null_embeddings.null_emb_masks"]
    assert torch.equal(null_mask[:, None].expand(expected_null_mask.shape).to(expected_null_mask.dtype), expected_null_mask)

    # extract_feature_for_inference: [conditional ; unconditional] masks; an empty prompt makes both unconditional.
    conditional = chunk_caption_rows(
        model.caption_tokens(),
        caption.repeat(1, generated, 1, 1),
        mask[:, None].repeat(1, generated, 1),
        flags,
        negative=(null_embeds, null_mask),
    )[1]
    expected = outputs["extract_feature_for_inference.emb_masks"]
    assert torch.equal(conditional.to(expected.dtype), expected[:1, clean:])
    assert torch.equal(null_mask[:, None].expand(-1, expected.shape[1], -1).to(expected.dtype), expected[1:])


def test_duration_tokens_count_the_chunks_that_follow():
    model = _conditioning_model(torch.randn(800, 8))
    with torch.no_grad():
        model.caption_tokens.special_tokens.copy_(torch.arange(len(SPECIAL_TOKEN_NAMES))[:, None].float().expand(-1, 8))
    caption = torch.zeros(1, 10, 800, 8)
    embeds, _ = chunk_caption_rows(model.caption_tokens(), caption, torch.ones(1, 10, 800), ["duration"])
    first_tokens = embeds[0, :, 0, 0].tolist()
    expected = [SPECIAL_TOKEN_NAMES.index(f"duration_{min(9 - i, 7) + 1}") for i in range(10)]
    assert first_tokens == expected
    # A window of the same video gets the same tokens as the whole video.
    window, _ = chunk_caption_rows(model.caption_tokens(), caption[:, 3:5], torch.ones(1, 2, 800), ["duration"], [3, 4], 10)
    assert window[0, :, 0, 0].tolist() == expected[3:5]


def test_empty_prompt_rows_take_the_unconditional_caption():
    model = _conditioning_model(torch.randn(800, 8))
    caption = torch.randn(2, 3, 800, 8)
    mask = torch.ones(2, 3, 800)
    mask[1, 1] = 0
    negative = negative_caption_rows(model.caption_tokens(), 2)
    embeds, masks = chunk_caption_rows(model.caption_tokens(), caption, mask, ["hq"], negative=negative)
    assert torch.equal(embeds[1, 1], negative[0][1]) and torch.equal(masks[1, 1], negative[1][1])
    assert masks[0, 0, :2].tolist() == [1.0, 1.0] and masks[1, 1].sum() == 50


def test_prompt_cleaning_matches_the_original():
    recorded = json.loads((REPO_ROOT / "tests" / "data" / "prompt_cleaning_original.json").read_text())
    for prompt, expected in recorded["cases"]:
        assert clean_prompt(prompt) == expected, prompt


def test_chunk_prompt_schedules():
    assert resolve_chunk_prompts(["a", "b", "c"], 3) == ["a", "b", "c"]
    assert resolve_chunk_prompts({0: "a", 2: "b"}, 4) == ["a", "a", "b", "b"]
    with pytest.raises(ValueError, match="3 prompts but the video has 4"):
        resolve_chunk_prompts(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="chunk 0"):
        resolve_chunk_prompts({1: "a"}, 4)
    with pytest.raises(ValueError, match="keys must be chunk indices"):
        resolve_chunk_prompts({0: "a", 7: "b"}, 4)
    with pytest.raises(TypeError):
        resolve_chunk_prompts("a single string", 2)


def test_cut_caption_padding_keeps_one_common_length_and_the_same_velocity():
    """Captions are cut jointly after the last position valid in any row of any of them (one position kept when
    none is valid); the transformer masks the padding, so its output is the same to float rounding."""
    from diffusers_magi.pipelines.text_conditioning_magi import cut_caption_padding

    from .conftest import relative_max_error
    from .tiny_models import tiny_transformer

    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 3, 40, 32, generator=generator)
    mask = (torch.arange(40) < torch.tensor([[5], [12]])).float()[:, None].expand(-1, 3, -1)
    negative = torch.randn(2, 3, 40, 32, generator=generator)
    negative_mask = (torch.arange(40) < 20).float().expand(2, 3, -1)

    (cut, cut_mask), (cut_negative, cut_negative_mask) = cut_caption_padding((embeds, mask), (negative, negative_mask))
    assert cut.shape == cut_negative.shape == (2, 3, 20, 32) and cut_mask.shape == (2, 3, 20)
    assert torch.equal(cut, embeds[..., :20, :]) and torch.equal(cut_negative_mask, negative_mask[..., :20])
    [(alone, alone_mask)] = cut_caption_padding((embeds, mask))
    assert alone.shape[-2] == alone_mask.shape[-1] == 12
    [(empty, empty_mask)] = cut_caption_padding((embeds, torch.zeros_like(mask)))
    assert empty.shape[-2] == empty_mask.shape[-1] == 1

    transformer = tiny_transformer()
    latents = torch.randn(2, 16, 18, 4, 4, generator=generator)
    timestep = torch.tensor([[0.9, 0.5, 0.1]]).expand(2, -1)
    padded = transformer(latents, timestep, embeds, mask, caption_dropped=False).sample
    shortened = transformer(latents, timestep, alone, alone_mask, caption_dropped=False).sample
    assert relative_max_error(shortened, padded) <= 1e-6
