"""Plain records for products, queries, purchases and boxes.

These are the in-memory shape of the product store (see ``docs/store-format.md``). They carry image
*references* (paths, or already-decoded ``PIL.Image`` objects for queries that arrive over HTTP), never
decoded pixels read from disk, so streaming a large store stays cheap.

``Product.images`` and ``Query.images`` hold absolute paths when the records come from
:class:`moon.data.ProductStore`; ``crops`` holds one crop reference per image that a detector cropped
(see ``boxes.parquet``) aligned with ``images``: ``crops[i]`` is the crop of ``images[i]``, or
``None`` where the detector kept that image whole (an empty list means no crops at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Union

try:  # PIL is a hard dependency, but keep the records importable for type checkers without it
    from PIL import Image as _PILImage

    ImageRef = Union[str, os.PathLike, _PILImage.Image]
except ImportError:  # pragma: no cover
    ImageRef = Union[str, os.PathLike]  # type: ignore[misc]

SPLITS = ("train", "val", "test")
MAX_CATEGORY_LEVELS = 5


@dataclass
class Product:
    """One product listing.

    Attributes:
        id: unique product id (kept as given by the source, e.g. MBE's hex ids).
        title: the listing title.
        images: image references (paths relative to the store on disk, absolute in memory).
        category: category path root → leaf, at most 5 levels (``["Apparel", "Shoes", "Sneakers"]``).
        attributes: attribute type → list of values (``{"color": ["white"], "brand": ["nike"]}``).
        group: optional id shared by duplicate listings of the same item (other sellers).
        crops: core-region crops aligned with ``images`` (``None`` for an uncropped image; empty
            when there are no crops; filled from ``boxes.parquet``).
    """

    id: str
    title: str = ""
    images: list[ImageRef] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    group: str | None = None
    crops: list[ImageRef | None] = field(default_factory=list)


@dataclass
class Query:
    """One search query: text, image(s), or both.

    Attributes:
        id: unique query id.
        text: the query text, or ``None`` for a pure image query.
        images: query photos (may be empty).
        split: ``train``, ``val`` or ``test``.
        crops: core-region crops aligned with ``images`` (``None`` entries allowed; may be empty).
    """

    id: str
    text: str | None = None
    images: list[ImageRef] = field(default_factory=list)
    split: str = "test"
    crops: list[ImageRef | None] = field(default_factory=list)

    @property
    def modality(self) -> str:
        """``text``, ``image``, ``multimodal`` or ``empty``."""
        has_text = bool(self.text and self.text.strip())
        has_image = bool(self.images)
        if has_text and has_image:
            return "multimodal"
        if has_image:
            return "image"
        if has_text:
            return "text"
        return "empty"


@dataclass
class Purchase:
    """A purchase that followed a query: the positive pair (query → product).

    ``timestamp`` is seconds since the Unix epoch (UTC); ``region`` is a free-form market/region code.
    """

    query_id: str
    product_id: str
    timestamp: int = 0
    region: str = ""


@dataclass
class Box:
    """A box on one image, in pixels (x0, y0 inclusive; x1, y1 exclusive).

    ``image`` is the image path relative to the store; ``source`` is ``truth`` or a detector name;
    ``crop`` optionally names the stored crop file; ``kind`` optionally tells the image kind
    (``clean``, ``scene``, ``banner``, ``detail``, ``query``) for per-kind evaluation.
    """

    image: str
    x0: float
    y0: float
    x1: float
    y1: float
    source: str = "truth"
    score: float = 1.0
    crop: str | None = None
    kind: str | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 when either is empty."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def product_text(product: Product, *, with_category: bool = True, with_attributes: bool = True) -> str:
    """The product text template of PAPER.md §2:
    ``Title: <title>\\nCategory: <l1> > <l2>\\nAttributes: color: white; brand: nike``.
    """
    lines = [f"Title: {product.title}"]
    if with_category and product.category:
        lines.append("Category: " + " > ".join(product.category))
    if with_attributes and product.attributes:
        parts = [f"{k}: {', '.join(v)}" for k, v in product.attributes.items() if v]
        if parts:
            lines.append("Attributes: " + "; ".join(parts))
    return "\n".join(lines)


def as_dict(record: Any) -> dict[str, Any]:
    """A record as a plain dict (image references stringified)."""
    from dataclasses import asdict

    out = asdict(record)
    for key in ("images", "crops"):
        if key in out:
            out[key] = [x if x is None else str(x) if not hasattr(x, "size") else "<image>" for x in out[key]]
    return out
