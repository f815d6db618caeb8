"""Attribute types of the world and how a product family and its variants draw their values.

Seven attribute types, each visible in the pictures (see :mod:`moon.world.appearance`):
colour (recolouring), pattern (overlay), material (surface texture), size (scale in the main
shot), style (tone/outline treatment), brand (a logo badge with the brand name) and pack (how many
units are shown). Siblings of one family share material, style, size and pack and differ only by
colour, brand or pattern: the hard negatives of the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (206, 32, 41),
    "blue": (30, 90, 200),
    "green": (40, 150, 60),
    "yellow": (240, 200, 30),
    "black": (35, 35, 38),
    "white": (238, 238, 232),
    "pink": (240, 120, 170),
    "purple": (120, 60, 170),
    "orange": (245, 130, 30),
    "brown": (125, 80, 45),
    "grey": (130, 130, 135),
    "navy": (25, 35, 90),
    "beige": (215, 195, 160),
    "teal": (20, 140, 140),
}
PATTERNS = ("solid", "striped", "polka dot", "plaid", "zigzag")
MATERIALS = ("plastic", "metal", "wood", "leather", "cotton", "glass")
SIZES = ("S", "M", "L", "XL")
STYLES = ("classic", "vintage", "sport", "minimalist", "cute", "luxury")
BRANDS = (
    "Aurora",
    "Zenko",
    "Brava",
    "Lumio",
    "Kestrel",
    "Orbita",
    "Pinnacle",
    "Vela",
    "Nordik",
    "Mosaic",
    "Tamba",
    "Quill",
    "Sorano",
    "Hanami",
    "Deltix",
    "Polaris",
    "Kiwika",
    "Marlo",
    "Tesso",
    "Yuki",
    "Fenwick",
    "Calypso",
    "Rivo",
    "Onda",
)
PACKS = ("1 pc", "2 pcs", "3 pcs")

#: attribute types in the order they are stored on a product
ATTRIBUTE_TYPES = ("color", "pattern", "material", "size", "style", "brand", "pack")

#: size value → longest side of the product in the clean main shot, as a fraction of the image
SIZE_SCALE = {"S": 0.50, "M": 0.62, "L": 0.74, "XL": 0.86}

# materials that make sense per industry (food is never "metal")
_MATERIALS_BY_INDUSTRY = {
    "Food & Drink": ("plastic", "glass", "cotton"),
    "Fashion": ("cotton", "leather", "plastic"),
    "Books & Media": ("cotton", "leather", "plastic"),
}


@dataclass(frozen=True)
class Variant:
    """The attribute values of one sellable item (one or more listings)."""

    color: str
    pattern: str
    material: str
    size: str
    style: str
    brand: str
    pack: str

    def as_attributes(self) -> dict[str, list[str]]:
        """``{type: [value]}`` in :data:`ATTRIBUTE_TYPES` order."""
        return {k: [getattr(self, k)] for k in ATTRIBUTE_TYPES}


@dataclass
class FamilyPlan:
    """A product family: one model (drawing or photo), shared traits and its sibling variants."""

    variants: list[Variant] = field(default_factory=list)


def _pick(rng: np.random.Generator, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


def plan_family(rng: np.random.Generator, industry: str, n_variants: int) -> FamilyPlan:
    """Draw ``n_variants`` siblings: shared material/style/size/pack, distinct colour–brand–pattern combos."""
    materials = _MATERIALS_BY_INDUSTRY.get(industry, MATERIALS)
    material = _pick(rng, materials)
    style = _pick(rng, STYLES)
    size = _pick(rng, SIZES)
    pack = _pick(rng, PACKS, p=[0.7, 0.2, 0.1])
    base_brand = _pick(rng, BRANDS)
    base_pattern = _pick(rng, PATTERNS, p=[0.5, 0.15, 0.15, 0.1, 0.1])
    colors = list(COLORS)
    order = rng.permutation(len(colors))
    plan = FamilyPlan()
    seen: set[tuple[str, str, str]] = set()
    for i in range(n_variants):
        color = colors[int(order[i % len(colors)])]
        brand = base_brand if rng.random() < 0.6 else _pick(rng, BRANDS)
        pattern = base_pattern if rng.random() < 0.7 else _pick(rng, PATTERNS)
        while (color, brand, pattern) in seen:
            brand = _pick(rng, BRANDS)
        seen.add((color, brand, pattern))
        plan.variants.append(Variant(color, pattern, material, size, style, brand, pack))
    return plan
