"""How MAGI-1 turns prompts into per-chunk caption rows: text cleaning, learned special tokens, null captions.

* `clean_prompt` is the caption cleaning the T5 embedder of MAGI-1 applies (twice) before tokenising.
* `chunk_caption_rows` lays a caption out per chunk and prepends the learned special tokens: quality / style flags
  and a "k chunks remain" duration token. Each token is put in front and the sequence is truncated to its length, so
  the last token prepended ends up first: with `["hq", "duration"]` a chunk reads `[duration_k, hq, caption...]`.
* `negative_caption_rows` is the unconditional caption: the first 50 tokens of the learned null caption, optionally
  preceded by the negative special tokens.
* `cut_caption_padding` drops the padding after the last valid token before caption rows enter the transformer.
"""

import html
import re
import urllib.parse
from typing import List, Optional, Sequence, Tuple

import torch

# Flags the caption of a generated chunk can carry, in the order they are prepended.
SPECIAL_TOKEN_FLAGS = (
    "static_first_frames",
    "dynamic_first_frames",
    "borderness",
    "hq",
    "three_d_model",
    "two_d_anime",
    "duration",
)
DEFAULT_SPECIAL_TOKENS = ("hq", "duration")
# Tokens prepended (in this order) to the unconditional caption when negative special tokens are on.
NEGATIVE_SPECIAL_TOKENS = ("caption", "logo", "trans", "borderness")
NULL_CAPTION_TOKENS = 50
MAX_DURATION_TOKEN = 8


def _prepend(token: torch.Tensor, embeds: torch.Tensor, mask: Optional[torch.Tensor]):
    """Put `token` (C,) in front of every row of `embeds` (..., L, C) and cut back to L; same for `mask` (..., L)."""
    length = embeds.shape[-2]
    token = token.to(embeds.device, embeds.dtype).expand(*embeds.shape[:-2], 1, -1)
    embeds = torch.cat([token, embeds], dim=-2)[..., :length, :]
    if mask is not None:
        ones = torch.ones(*mask.shape[:-1], 1, dtype=embeds.dtype, device=mask.device)
        mask = torch.cat([ones, mask], dim=-1)[..., :length]
    return embeds, mask


def validate_special_tokens(special_tokens: Optional[Sequence[str]]) -> Tuple[str, ...]:
    special_tokens = tuple(special_tokens or ())
    unknown = [flag for flag in special_tokens if flag not in SPECIAL_TOKEN_FLAGS]
    if unknown:
        raise ValueError(f"Unknown special_tokens {unknown}; choose from {list(SPECIAL_TOKEN_FLAGS)}.")
    return special_tokens


def chunk_caption_rows(
    learned_tokens,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    special_tokens: Sequence[str],
    chunk_indices: Optional[Sequence[int]] = None,
    num_generated_chunks: Optional[int] = None,
    negative: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Caption rows of generated chunks, special tokens prepended.

    Args:
        learned_tokens (`MagiLearnedTokens`): the transformer's learned tokens, `transformer.caption_tokens()`.
        prompt_embeds (`torch.Tensor` of shape `(batch, chunks, text_length, text_dim)`): caption of each chunk.
        prompt_attention_mask (`torch.Tensor` of shape `(batch, chunks, text_length)`).
        special_tokens (`Sequence[str]`): flags from `SPECIAL_TOKEN_FLAGS`; order does not matter.
        chunk_indices (`Sequence[int]`, *optional*): index, among the generated chunks, of each row (default
            `0 .. chunks - 1`); it selects the duration token.
        num_generated_chunks (`int`, *optional*): chunks the video generates (default: `chunks`).
        negative (`(embeds, mask)` of shapes `(batch, text_length, text_dim)`, `(batch, text_length)`, *optional*):
            the unconditional caption; a chunk whose caption is empty (all-zero mask) gets it instead, as the original
            does for an empty prompt.

    Returns:
        `(embeds, mask)` of the input shapes. The mask keeps the input dtype without special tokens and becomes the
        embedding dtype with them, as in the original (only its non-zero pattern matters).
    """
    special_tokens = validate_special_tokens(special_tokens)
    embeds, mask = prompt_embeds, prompt_attention_mask
    if chunk_indices is None:
        chunk_indices = range(embeds.shape[1])
    if num_generated_chunks is None:
        num_generated_chunks = embeds.shape[1]
    for flag in SPECIAL_TOKEN_FLAGS:
        if flag not in special_tokens:
            continue
        if flag == "duration":
            # A chunk is told how many chunks come after it (clamped at 8).
            rows = [
                _prepend(
                    learned_tokens.special_token(f"duration_{min(num_generated_chunks - 1 - index, MAX_DURATION_TOKEN - 1) + 1}"),
                    embeds[:, row : row + 1],
                    mask[:, row : row + 1],
                )
                for row, index in enumerate(chunk_indices)
            ]
            embeds = torch.cat([row[0] for row in rows], dim=1)
            mask = torch.cat([row[1] for row in rows], dim=1)
        else:
            embeds, mask = _prepend(learned_tokens.special_token(flag), embeds, mask)
    if negative is not None:
        empty = prompt_attention_mask.sum(-1) == 0
        negative_embeds, negative_mask = negative[0][:, None], negative[1][:, None]
        embeds = torch.where(empty[..., None, None], negative_embeds, embeds)
        mask = torch.where(empty[..., None], negative_mask.to(mask.dtype), mask)
    return embeds, mask


def negative_caption_rows(
    learned_tokens,
    batch_size: int,
    negative_special_tokens: bool = False,
    negative_prompt_embeds: Optional[torch.Tensor] = None,
    negative_prompt_attention_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unconditional caption, `(batch, text_length, text_dim)` and its mask `(batch, text_length)`, from the
    transformer's learned tokens (`learned_tokens = transformer.caption_tokens()`).

    By default the learned null caption with a mask on its first 50 tokens (the mask does not move when negative
    special tokens are prepended, as in the original). With `negative_prompt_embeds`, that embedding and its mask
    (shifted by prepended tokens like a conditional caption)."""
    if negative_prompt_embeds is None:
        null = learned_tokens.null_caption_embedding.float()
        embeds = null.expand(batch_size, -1, -1)
        mask = torch.zeros(batch_size, null.shape[0], device=null.device)
        mask[:, :NULL_CAPTION_TOKENS] = 1
        keep_mask = True
    else:
        embeds, mask = negative_prompt_embeds.float(), negative_prompt_attention_mask
        keep_mask = False
    if negative_special_tokens:
        for name in NEGATIVE_SPECIAL_TOKENS:
            embeds, shifted = _prepend(learned_tokens.special_token(name), embeds, mask)
            mask = mask if keep_mask else shifted
    return embeds, mask


# ------------------------------------------------------------------------------------------------------------------
# Prompt text cleaning (as MAGI-1's T5 embedder does it before tokenising)
# ------------------------------------------------------------------------------------------------------------------
_BAD_PUNCTUATION = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")
_URL_PATTERNS = (
    re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
    re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
)
_CJK_RANGES = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff", "\u4e00-\u9fff")
_DASHES = re.compile(
    "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+"
)


def _basic_clean(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _clean_caption_once(caption: str) -> str:
    from bs4 import BeautifulSoup

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    for pattern in _URL_PATTERNS:
        caption = pattern.sub("", caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @handles
    for character_range in _CJK_RANGES:
        caption = re.sub(f"[{character_range}]+", "", caption)
    caption = _DASHES.sub("-", caption)
    caption = re.sub(r"[`´«»“”¨]", '"', caption)
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # IP addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)
    caption = re.sub(r"#\d{1,3}\b", "", caption)
    caption = re.sub(r"#\d{5,}\b", "", caption)
    caption = re.sub(r"\b\d{6,}\b", "", caption)
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # file names
    caption = re.sub(r"[\"\']{2,}", r'"', caption)
    caption = re.sub(r"[\.]{2,}", r" ", caption)
    caption = _BAD_PUNCTUATION.sub(" ", caption)
    caption = re.sub(r"\s+\.\s+", r" ", caption)
    separators = re.compile(r"(?:\-|\_)")
    if len(separators.findall(caption)) > 3:  # this-is-a-slug / this_is_a_slug
        caption = separators.sub(" ", caption)
    caption = _basic_clean(caption)
    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)
    caption = re.sub(r"\s+", " ", caption)
    caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def clean_prompt(prompt: str) -> str:
    """MAGI-1's prompt cleaning (the DeepFloyd-IF caption cleaning, applied twice)."""
    return _clean_caption_once(_clean_caption_once(prompt))


def resolve_chunk_prompts(chunk_prompts, num_generated_chunks: int, argument: str = "chunk_prompts") -> List[str]:
    """One prompt per generated chunk from a list (one per chunk) or a `{first_chunk: prompt}` schedule (each prompt
    holds until the next key)."""
    if isinstance(chunk_prompts, dict):
        if not chunk_prompts or min(chunk_prompts) != 0:
            raise ValueError(f"{argument} as a schedule must have an entry for chunk 0, got keys {sorted(chunk_prompts)}.")
        if max(chunk_prompts) >= num_generated_chunks or any(not isinstance(k, int) for k in chunk_prompts):
            raise ValueError(
                f"{argument} keys must be chunk indices in [0, {num_generated_chunks}) (this video has "
                f"{num_generated_chunks} generated chunks), got {sorted(chunk_prompts)}."
            )
        keys = sorted(chunk_prompts)
        return [chunk_prompts[max(k for k in keys if k <= chunk)] for chunk in range(num_generated_chunks)]
    if isinstance(chunk_prompts, (list, tuple)) and all(isinstance(p, str) for p in chunk_prompts):
        if len(chunk_prompts) != num_generated_chunks:
            raise ValueError(
                f"{argument} has {len(chunk_prompts)} prompts but the video has {num_generated_chunks} generated "
                f"chunks (24 frames each); give one prompt per chunk or a {{chunk_index: prompt}} schedule."
            )
        return list(chunk_prompts)
    raise TypeError(f"{argument} must be a list of strings or a dict {{chunk_index: prompt}}, got {type(chunk_prompts)}.")


def cut_caption_padding(*captions: Tuple[torch.Tensor, torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Caption rows `(embeds (..., L, C), mask (..., L))`, all cut after the last position that is valid in any row
    of any of them (at least one position is kept), so that they keep one common length and can still be batched.

    The transformer masks the padding, so a cut caption gives the same velocity (to float rounding: the original
    projects and attends to the valid tokens only) for less work: T5 pads to 800 tokens, prompts use tens. The cut
    is made before the transformer call, never inside it, so an eager and a compiled transformer see the same shapes.
    """
    valid = torch.stack([mask.flatten(0, -2).bool().any(dim=0) for _, mask in captions]).any(dim=0).nonzero()
    length = int(valid[-1]) + 1 if len(valid) else 1
    return [(embeds[..., :length, :], mask[..., :length]) for embeds, mask in captions]
