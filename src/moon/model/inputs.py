"""Records → token sequences with an aspect tag per token, and padded batches.

A product becomes one sequence::

    <instruction> [<open> image_i <close> (<open> crop_i <close>)]*
    Title: <title>\\nCategory: <path>\\nAttributes: <attrs><|im_end|>

(the text is exactly :func:`moon.data.product_text`; empty category/attributes are omitted;
``<open>``/``<close>`` are the family's :class:`Markers`, ``<|vision_start|>``/``<|vision_end|>`` for
Qwen-VL). A query becomes ``<instruction> [images/crops] <text><end>``. Every token carries an
aspect tag (see :data:`moon.model.config.ASPECTS`).

Documented edge cases:

* more than ``max_images`` images: the first ``max_images`` are kept (crops of those only), with
  a :class:`TruncationWarning`;
* text longer than ``max_text_tokens``: the title is shortened first, then the tail is cut, with a
  :class:`TruncationWarning`;
* an empty title or zero images: encoded as is (the template words remain), no error;
* a query with neither text nor images: :class:`moon.errors.DataError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moon.data import Product, Query, load_image
from moon.errors import DataError
from moon.model.config import ASPECTS, MoonConfig

ASPECT_ID = {name: i for i, name in enumerate(ASPECTS)}


class TruncationWarning(UserWarning):
    """Input was shortened to fit the configured limits (images or text tokens)."""


@dataclass
class EncodedInput:
    """One record ready for the model (CPU tensors, picklable).

    Attributes:
        input_ids: ``(L,)`` int64 token ids (image placeholders included).
        aspect_ids: ``(L,)`` int64 aspect tag ids (index into ``ASPECTS``).
        pixel_values: the backbone's payload of all images, or ``None``: for Qwen-VL ``(P, C·T·p·p)``
            float32 flattened patches; for the graft cached encoder features ``(Σk, D)`` (or pixels).
        image_grid_thw: ``(n_images, 3)`` int64 grid per image (Qwen-VL patches; graft ``(1, √k, √k)``), or ``None``.
        image_aspects: aspect name per image (``vision`` or ``crop``).
        record_id: the product/query id (for messages).
    """

    input_ids: torch.Tensor
    aspect_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    image_aspects: list[str]
    record_id: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Markers:
    """The token ids a backbone family brackets images and ends sequences with.

    ``image_open`` / ``image_close`` go before / after each image's visual tokens, ``image_pad`` is the
    id written at visual-token positions (Qwen-VL's ``<|image_pad|>``; the graft replaces those
    embeddings, so any id works), ``end`` closes every sequence and ``pad`` fills batches.
    """

    image_open: tuple[int, ...]
    image_close: tuple[int, ...]
    image_pad: int
    end: int
    pad: int

    @classmethod
    def qwen_vl(cls, tokenizer) -> Markers:
        ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|im_end|>"])
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return cls((ids[0],), (ids[1],), ids[2], ids[3], pad)


class ImageInputs(Protocol):
    """Turns a record's images into the backbone's payload (what ``collate`` concatenates as
    ``pixel_values``) and one ``(t, h, w)`` grid row per image; ``n_tokens`` counts an image's
    visual tokens from its grid row."""

    def __call__(self, refs: Sequence) -> tuple[torch.Tensor, torch.Tensor]: ...

    def n_tokens(self, thw: Sequence[int]) -> int: ...


class QwenImageInputs:
    """The Qwen2-VL image processor as :class:`ImageInputs` (``merge_size``² patches per token)."""

    def __init__(self, image_processor, merge_size: int = 2):
        self.image_processor = image_processor
        self.merge_size = merge_size

    def __call__(self, refs: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=[load_image(r) for r in refs], return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()

    def n_tokens(self, thw: Sequence[int]) -> int:
        return int(thw[0] * thw[1] * thw[2]) // (self.merge_size**2)


class InputBuilder:
    """Turns products/queries into :class:`EncodedInput` given a tokenizer, the backbone family's
    :class:`ImageInputs` and its :class:`Markers`."""

    def __init__(self, config: MoonConfig, tokenizer, images: ImageInputs, markers: Markers):
        self.config = config
        self.tokenizer = tokenizer
        self.images = images
        self.markers = markers
        self.pad_id = markers.pad

    # -- text -------------------------------------------------------------------------------
    def _encode_segments(self, segments: list[tuple[str, str]]) -> list[tuple[list[int], str]]:
        texts = [text for text, _ in segments]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [(ids, aspect) for ids, (_, aspect) in zip(encoded, segments, strict=True)]

    def _fit_text(self, parts: list[tuple[list[int], str]], record_id: str) -> list[tuple[list[int], str]]:
        budget = self.config.max_text_tokens
        total = sum(len(ids) for ids, _ in parts)
        if total <= budget:
            return parts
        warnings.warn(
            f"{record_id}: text has {total} tokens > max_text_tokens={budget}; shortened (title first)",
            TruncationWarning,
            stacklevel=4,
        )
        over = total - budget
        parts = [(list(ids), aspect) for ids, aspect in parts]
        for ids, aspect in parts:
            if aspect in ("title", "query_text") and over > 0:
                cut = min(over, len(ids))
                del ids[len(ids) - cut :]
                over -= cut
        out: list[tuple[list[int], str]] = []
        room = budget
        for ids, aspect in parts:
            out.append((ids[:room], aspect))
            room -= len(out[-1][0])
        return out

    # -- images ---------------------------------------------------------------------------
    def image_refs(
        self, images: Sequence, crops: Sequence, use_crops: bool, record_id: str, *, warn: bool = True
    ) -> tuple[list, list[str]]:
        """The images a record is encoded with, in sequence order, and their aspects (``vision``/``crop``):
        the first ``max_images`` images, each followed by its crop when ``use_crops``."""
        n_max = self.config.max_images
        if len(images) > n_max and warn:
            warnings.warn(
                f"{record_id}: {len(images)} images > max_images={n_max}; keeping the first {n_max}",
                TruncationWarning,
                stacklevel=4,
            )
        kept = list(images[:n_max])
        kept_crops = list(crops[: len(kept)]) if use_crops else []
        refs, aspects = [], []
        for i, ref in enumerate(kept):
            refs.append(ref)
            aspects.append("vision")
            if i < len(kept_crops) and kept_crops[i] is not None:
                refs.append(kept_crops[i])
                aspects.append("crop")
        return refs, aspects

    def _images(self, images: Sequence, crops: Sequence, use_crops: bool, record_id: str):
        refs, aspects = self.image_refs(images, crops, use_crops, record_id)
        if not refs:
            return None, None, []
        payload, grid = self.images(refs)
        return payload, grid, aspects

    def _assemble(self, prefix: list[tuple[list[int], str]], grid, image_aspects, text_parts, record_id):
        ids: list[int] = []
        tags: list[int] = []

        def put(seq: list[int], aspect: str) -> None:
            ids.extend(seq)
            tags.extend([ASPECT_ID[aspect]] * len(seq))

        for seq, aspect in prefix:
            put(seq, aspect)
        mk = self.markers
        if grid is not None:
            for thw, aspect in zip(grid.tolist(), image_aspects, strict=True):
                put(list(mk.image_open), "template")
                put([mk.image_pad] * self.images.n_tokens(thw), aspect)
                put(list(mk.image_close), "template")
        for seq, aspect in text_parts:
            put(seq, aspect)
        put([mk.end], "template")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(tags, dtype=torch.long)

    def prefetch(self, records: Sequence[Product | Query]) -> None:
        """Let the image side prepare every image of ``records`` at once (the graft family
        computes its frozen features in full batches); a no-op for families without it."""
        prefetch = getattr(self.images, "prefetch", None)
        if prefetch is None:
            return
        refs: list = []
        for r in records:
            use_crops = self.config.use_crops if isinstance(r, Product) else self.config.query_crops
            refs += self.image_refs(r.images, r.crops, use_crops, "", warn=False)[0]
        if refs:
            prefetch(refs)

    # -- records ----------------------------------------------------------------------------
    def product(self, product: Product) -> EncodedInput:
        """One product → one sequence (images, crops, text template)."""
        segments = [(self.config.product_instruction, "template")] if self.config.product_instruction else []
        n_prefix = len(segments)
        segments += [("Title: ", "template"), (product.title, "title")]
        if product.category:
            segments += [("\nCategory: ", "template"), (" > ".join(product.category), "category")]
        attrs = [f"{k}: {', '.join(v)}" for k, v in product.attributes.items() if v]
        if attrs:
            segments += [("\nAttributes: ", "template"), ("; ".join(attrs), "attribute")]
        encoded = [x for x in self._encode_segments(segments) if x[0] or x[1] == "template"]
        prefix, text = encoded[:n_prefix], encoded[n_prefix:]
        text = self._fit_text(text, f"product {product.id}")
        pv, grid, aspects = self._images(product.images, product.crops, self.config.use_crops, f"product {product.id}")
        ids, tags = self._assemble(prefix, grid, aspects, text, product.id)
        return EncodedInput(ids, tags, pv, grid, aspects, str(product.id))

    def query(self, query: Query) -> EncodedInput:
        """One query (text, images or both) → one sequence."""
        if query.modality == "empty":
            raise DataError(f"query {query.id}: has neither text nor images; nothing to embed")
        segments = []
        if self.config.query_instruction:
            segments.append((self.config.query_instruction, "template"))
        if query.text and query.text.strip():
            segments.append((query.text, "query_text"))
        encoded = self._encode_segments(segments)
        n_prefix = 1 if self.config.query_instruction else 0
        prefix, text = encoded[:n_prefix], encoded[n_prefix:]
        text = self._fit_text(text, f"query {query.id}")
        pv, grid, aspects = self._images(query.images, query.crops, self.config.query_crops, f"query {query.id}")
        ids, tags = self._assemble(prefix, grid, aspects, text, query.id)
        return EncodedInput(ids, tags, pv, grid, aspects, str(query.id))


def collate(items: Sequence[EncodedInput], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad a list of inputs into one batch (CPU).

    Returns ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)``, ``aspect_ids`` ``(B, L)``
    (``-1`` on padding), ``pixel_values`` ``(ΣP, D)`` or ``None`` and ``image_grid_thw``
    ``(Σn_images, 3)`` or ``None``, images in item order.
    """
    if not items:
        raise ValueError("collate() needs at least one input")
    length = max(len(x) for x in items)
    n = len(items)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    aspect_ids = torch.full((n, length), -1, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, item in enumerate(items):
        k = len(item)
        input_ids[i, :k] = item.input_ids
        aspect_ids[i, :k] = item.aspect_ids
        mask[i, :k] = 1
    pvs = [x.pixel_values for x in items if x.pixel_values is not None]
    grids = [x.image_grid_thw for x in items if x.image_grid_thw is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "aspect_ids": aspect_ids,
        "pixel_values": torch.cat(pvs) if pvs else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }
