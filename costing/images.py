"""What one image in a prompt may cost, per model family: the budget reserves the most an image
part can be billed, as the proxy never decodes images (their size is unknown before the answer).

OpenAI bills image inputs as input tokens in one of two ways (its Images and vision guide,
"Calculating costs", read 2026-12):
- tiles: at detail `high` (and `auto`, which may choose it) a base plus an amount per 512-px
  tile. The image is scaled to fit 2048 x 2048, then its shortest side to 768 px (OpenAI's
  largest high-detail image is 768 x 2000), so it covers at most 2 x 4 = 8 tiles: 85 + 8 x 170 =
  1,445 tokens on gpt-4o (a 2:1 image, 768 x 1536, is 6 tiles: the 1,105 reserved before).
  Detail `low` is the base alone (one 512-px image).
- patches: 32-px patches, at most 1,536 (larger images are scaled down), times a per-model
  multiplier. OpenAI documents no low-detail budget for these models, so `low` counts as high.

The table is by model family: a family's name matches itself and its variants after a `-`
(`gpt-4o-2024-08-06`, `o3-pro`), never a newer family that merely starts the same
(`gpt-5.4` is not `gpt-5`): a family the table does not know reserves the largest figure in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

MAX_TILES = 8  # 768 x 2048 after scaling: 2 x 4 tiles of 512 px
MAX_PATCHES = 1536


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """The most one image part may be billed, in input tokens: at detail `low`, and at `high` /
    `auto` / unset (any other value counts as high)."""

    low: int
    high: int


def tiles(base: int, per_tile: int) -> ImageTokens:
    return ImageTokens(base, base + MAX_TILES * per_tile)


def patches(multiplier: str) -> ImageTokens:
    most = math.ceil(MAX_PATCHES * Decimal(multiplier))
    return ImageTokens(most, most)


FAMILIES: dict[str, ImageTokens] = {
    "gpt-4o": tiles(85, 170),  # 85 / 1,445
    "chatgpt-4o": tiles(85, 170),
    "gpt-4o-mini": tiles(2833, 5667),  # 2,833 / 48,169: the dearest image of all
    "gpt-4": tiles(85, 170),  # gpt-4-turbo, gpt-4-vision-preview
    # Documented both with the 4o tiles (85 + 170 each: 1,445) and as 1 token per patch (1,536):
    # the larger.
    "gpt-4.1": ImageTokens(85, MAX_PATCHES),
    "gpt-4.1-mini": patches("1.62"),  # 2,489
    "gpt-4.1-nano": patches("2.46"),  # 3,779
    "gpt-4.5": tiles(85, 170),
    "gpt-5": tiles(70, 140),  # 70 / 1,190: gpt-5, gpt-5-chat-latest, gpt-5-pro, gpt-5-codex
    "gpt-5-mini": patches("1.62"),
    "gpt-5-nano": patches("2.46"),
    "o1": tiles(75, 150),  # 75 / 1,275: o1, o1-pro
    "o3": tiles(75, 150),  # o3, o3-pro
    "o4-mini": patches("1.72"),  # 2,642
    "computer-use-preview": tiles(65, 129),  # 65 / 1,097
}
# A model no family matches (a newer family, another vendor's, none named): the largest known.
UNKNOWN = ImageTokens(max(f.low for f in FAMILIES.values()), max(f.high for f in FAMILIES.values()))


@lru_cache(maxsize=1024)
def image_tokens(model: str | None) -> ImageTokens:
    """The family figures for a model name (`openai/` prefix, a fine-tune's `ft:BASE:org::id` and
    letter case aside): the longest family that is the name or precedes a `-` in it."""
    if not model:
        return UNKNOWN
    name = model.lower().removeprefix("openai/")
    if name.startswith("ft:"):
        name = name.split(":")[1]
    best: tuple[int, ImageTokens] | None = None
    for family, figures in FAMILIES.items():
        if (name == family or name.startswith(family + "-")) and (best is None or len(family) > best[0]):
            best = (len(family), figures)
    return best[1] if best is not None else UNKNOWN


def images_tokens(model: str | None, images: int, low: int) -> int:
    """What `images` image parts, `low` of them at detail low, may be billed on `model`."""
    figures = image_tokens(model)
    return (images - low) * figures.high + low * figures.low
