"""The learned detector: a light box head on frozen EfficientNet-Lite0 features.

The head sees the ``(432, G, G)`` feature map (G = input/16) and predicts, per cell, an objectness
logit and the distances ``(l, t, r, b)`` from the cell centre to the box sides (fractions of the
image). The output box is the softmax(objectness)-weighted mean of the boxes of the cells near the top cell,
so training can put a GIoU + L1 loss on the very box that inference returns; a Gaussian centre target
supervises the objectness map. At inference only the cells around the top cell are averaged (see :func:`decode`).

Optionally a second *refining* head (same architecture, its own weights) looks again at a square window
around the first box (:mod:`moon.regions.refine_window`), resized to ``refine_size``, so small products
are seen at several times the resolution; its box, mapped back to the image, is the answer. The refining
pass may run ``refine_rounds`` times (each round re-centres the window on the previous round's box) and
with ``refine_flip`` averages its box with the one found on the mirrored window.
Saved as ``detector.json`` + ``head.safetensors`` (+ ``refine.safetensors``) (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from moon.errors import ConfigError
from moon.regions.backbone import FEATURE_CHANNELS, STRIDE8_CHANNELS, LiteFeatures, to_input
from moon.regions.base import Detection
from moon.regions.refine_window import crop_window, refine_window, window_to_image

FAMILY = "moon-learned-detector"
_CONFIG_KEYS = ("family", "version", "backbone", "input_size", "head", "refine")


class BoxHead(nn.Module):
    """``(B, C, G, G)`` features → objectness logits ``(B, G*G)`` and cell boxes ``(B, G*G, 4)`` (xyxy, image fractions).

    A 1×1 reduction, two depthwise-separable 3×3 mixing layers, and 1×1 outputs: light enough to
    train on a few thousand cached feature maps in minutes on a CPU. Under bfloat16 autocast (training
    on CPUs with native bf16) only the reduction and mixing layers run in bf16; the outputs are float32.
    """

    def __init__(self, in_channels: int = FEATURE_CHANNELS, width: int = 64):
        super().__init__()
        self.in_channels, self.width = in_channels, width
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.GELU())
        self.mix = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, width, 1), nn.GELU())
            for _ in range(2)
        )
        self.obj = nn.Conv2d(width, 1, 1)
        self.ltrb = nn.Conv2d(width, 4, 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, gh, gw = feats.shape
        h = self.reduce(feats)
        for layer in self.mix:
            h = h + layer(h)
        h = h.float()
        with torch.autocast(device_type=h.device.type, enabled=False):  # outputs in float32 even under autocast
            logits = self.obj(h).flatten(1)
            dist = torch.sigmoid(self.ltrb(h)).flatten(2).transpose(1, 2)  # (B, G*G, 4), each side ≤ 1 image
        ys = (torch.arange(gh, dtype=h.dtype, device=h.device) + 0.5) / gh  # float32, also for bf16 inputs
        xs = (torch.arange(gw, dtype=h.dtype, device=h.device) + 0.5) / gw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.flatten()[None], cy.flatten()[None]
        boxes = torch.stack([cx - dist[..., 0], cy - dist[..., 1], cx + dist[..., 2], cy + dist[..., 3]], dim=-1)
        return logits, boxes


def decode(logits: torch.Tensor, boxes: torch.Tensor, radius: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The box ``(B, 4)`` (image fractions) and its score ``(B,)`` from the head's outputs.

    The box is the softmax(objectness)-weighted mean of the cells' boxes within ``radius`` cells of
    the top cell (``radius < 0``: all cells), so two candidate objects are never averaged together.
    The score is the top cell's sigmoid objectness.
    """
    if radius >= 0:
        grid = int(round(logits.shape[1] ** 0.5))
        top = logits.argmax(dim=-1)
        r, c = top // grid, top % grid
        rows = torch.arange(grid, device=logits.device)
        near_r = (rows[None, :] - r[:, None]).abs() <= radius
        near_c = (rows[None, :] - c[:, None]).abs() <= radius
        mask = (near_r[:, :, None] & near_c[:, None, :]).flatten(1)
        logits_sel = logits.masked_fill(~mask, float("-inf"))
    else:
        logits_sel = logits
    prob = logits_sel.softmax(dim=-1)
    box = (prob.unsqueeze(-1) * boxes).sum(dim=1)  # unclamped: callers clip to the image
    score = torch.sigmoid(logits.max(dim=-1).values)
    return box, score


class LearnedDetector:
    """Detect with a trained head: ``LearnedDetector.load(model_dir).detect(image)``."""

    name = "learned"

    def __init__(
        self,
        head: BoxHead,
        *,
        input_size: int = 224,
        features: LiteFeatures | None = None,
        meta: dict | None = None,
        refine: BoxHead | None = None,
        refine_size: int = 160,
        context: float = 1.5,
        refine_rounds: int = 1,
        refine_flip: bool = False,
    ):
        self.head = head.eval()
        self.input_size = int(input_size)
        if features is None:  # the heads' input width tells whether they read the stride-8 map too
            features = LiteFeatures(stride8=head.in_channels == FEATURE_CHANNELS + STRIDE8_CHANNELS)
        self.features = features
        self.meta = dict(meta or {})
        self.refine = refine.eval() if refine is not None else None
        self.refine_size = int(refine_size)
        self.context = float(context)
        if refine_rounds < 1:
            raise ConfigError(f"refine rounds {refine_rounds} must be at least 1")
        self.refine_rounds = int(refine_rounds)
        self.refine_flip = bool(refine_flip)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``detector.json`` and ``head.safetensors`` under ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, str(out / "head.safetensors"))
        refine = None
        if self.refine is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.refine.state_dict().items()}
            save_file(state, str(out / "refine.safetensors"))
            refine = {
                "in_channels": self.refine.in_channels,
                "width": self.refine.width,
                "input_size": self.refine_size,
                "context": self.context,
                "rounds": self.refine_rounds,
                "flip": self.refine_flip,
            }
        elif (out / "refine.safetensors").exists():
            (out / "refine.safetensors").unlink()
        config = {
            **{k: v for k, v in self.meta.items() if k not in _CONFIG_KEYS},
            "family": FAMILY,
            "version": 2,
            "backbone": "efficientnet-lite0",
            "input_size": self.input_size,
            "head": {"in_channels": self.head.in_channels, "width": self.head.width},
            "refine": refine,
        }
        (out / "detector.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, *, features: LiteFeatures | None = None) -> LearnedDetector:
        """Load a detector written by :meth:`save` (``moon detect train``)."""
        from safetensors.torch import load_file

        root = Path(directory)
        cfg_path = root / "detector.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{root}: not a learned detector (no detector.json; train one with `moon detect train`)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_path}: unreadable ({exc})") from exc
        if cfg.get("family") != FAMILY:
            raise ConfigError(f"{cfg_path}: family {cfg.get('family')!r} is not {FAMILY!r}")
        head = BoxHead(**cfg["head"])
        try:
            head.load_state_dict(load_file(str(root / "head.safetensors")))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"{root / 'head.safetensors'}: cannot load the head ({exc})") from exc
        refine, rcfg = None, cfg.get("refine") or None
        if rcfg:
            refine = BoxHead(in_channels=rcfg["in_channels"], width=rcfg["width"])
            try:
                refine.load_state_dict(load_file(str(root / "refine.safetensors")))
            except (OSError, RuntimeError) as exc:
                raise ConfigError(f"{root / 'refine.safetensors'}: cannot load the refining head ({exc})") from exc
        det = cls(
            head,
            input_size=cfg["input_size"],
            features=features,
            meta=cfg,
            refine=refine,
            refine_size=rcfg["input_size"] if rcfg else 160,
            context=rcfg["context"] if rcfg else 2.0,
            refine_rounds=int(rcfg.get("rounds", 1)) if rcfg else 1,
            refine_flip=bool(rcfg.get("flip", False)) if rcfg else False,
        )
        digest = hashlib.sha1((root / "head.safetensors").read_bytes())
        if refine is not None:
            digest.update((root / "refine.safetensors").read_bytes())
            digest.update(det._refine_settings().encode())
        det._fingerprint = digest.hexdigest()[:16]
        return det

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha1(str(self.input_size).encode())
            heads = [("head", self.head)] + ([("refine", self.refine)] if self.refine is not None else [])
            if self.refine is not None:
                h.update(self._refine_settings().encode())
            for name, module in heads:
                for k, v in sorted(module.state_dict().items()):
                    h.update(f"{name}.{k}".encode())
                    h.update(v.detach().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _refine_settings(self) -> str:
        return f"{self.refine_size}/{self.context}/{self.refine_rounds}/{int(self.refine_flip)}"

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect_batch(self, images: list[Image.Image]) -> list[list[Detection]]:
        """One best box per image (pixels of that image)."""
        if not images:
            return []
        feats = self.features(to_input(images, self.input_size))
        box, score = decode(*self.head(feats))
        box = box.clamp(0.0, 1.0)
        first = [
            (b[0] * im.size[0], b[1] * im.size[1], b[2] * im.size[0], b[3] * im.size[1])
            for im, b in zip(images, box.tolist(), strict=True)
        ]
        if self.refine is not None:
            first = self._refine(images, first)
        return [[Detection(b, float(s))] for b, s in zip(first, score.tolist(), strict=True)]

    def _refine(
        self, images: list[Image.Image], boxes: list[tuple[float, float, float, float]]
    ) -> list[tuple[float, float, float, float]]:
        """Refining pass(es): the refining head on a window around each box, mapped back to image pixels."""
        for _ in range(self.refine_rounds):
            boxes = self._refine_once(images, boxes)
        return boxes

    def _refine_once(
        self, images: list[Image.Image], boxes: list[tuple[float, float, float, float]]
    ) -> list[tuple[float, float, float, float]]:
        windows = [refine_window(b, im.size, self.context) for im, b in zip(images, boxes, strict=True)]
        crops = [crop_window(im, win, self.refine_size) for im, win in zip(images, windows, strict=True)]
        if self.refine_flip:
            crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
        rbox, _ = decode(*self.refine(self.features(to_input(crops, self.refine_size))))
        if self.refine_flip:
            rbox = (rbox[: len(images)] + unflip_boxes(rbox[len(images) :])) / 2
        out = []
        for im, win, b in zip(images, windows, rbox.clamp(0.0, 1.0).tolist(), strict=True):
            w, h = im.size
            x0, y0, x1, y1 = window_to_image(tuple(b), win)
            out.append((min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)))
        return out

    def detect(self, image: Image.Image, title: str | None = None) -> list[Detection]:
        """The product box on ``image`` (the title is not used by this detector)."""
        return self.detect_batch([image])[0]


def unflip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` xyxy boxes (fractions) found on horizontally mirrored inputs → boxes of the unmirrored inputs."""
    return torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - GIoU`` of ``(N, 4)`` xyxy boxes."""
    return (1.0 - _giou_each(pred, target)).mean()


def center_target(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Gaussian centre heat-map target ``(N, grid*grid)`` (rows sum to 1) for ``(N, 4)`` boxes in [0, 1]."""
    c = (torch.arange(grid, dtype=boxes.dtype) + 0.5) / grid
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    sx = ((boxes[:, 2] - boxes[:, 0]) / 6).clamp(min=0.5 / grid)
    sy = ((boxes[:, 3] - boxes[:, 1]) / 6).clamp(min=0.5 / grid)
    gx = torch.exp(-((c[None] - cx[:, None]) ** 2) / (2 * sx[:, None] ** 2))
    gy = torch.exp(-((c[None] - cy[:, None]) ** 2) / (2 * sy[:, None] ** 2))
    t = (gy[:, :, None] * gx[:, None, :]).flatten(1)
    return t / t.sum(dim=1, keepdim=True).clamp(min=1e-12)


def head_loss(logits: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Training loss of the head for ``(N, 4)`` true boxes in [0, 1]: GIoU + L1 of the decoded box,
    centre cross-entropy, and GIoU of the cells near the centre."""
    grid = int(round(logits.shape[1] ** 0.5))
    pred, _ = decode(logits, boxes)
    pred_all, _ = decode(logits, boxes, radius=-1)
    heat = center_target(target, grid)
    ce = -(heat * logits.log_softmax(dim=-1)).sum(dim=1).mean()
    n, cells = boxes.shape[:2]
    flat_pred = boxes.reshape(-1, 4)
    flat_tgt = target.repeat_interleave(cells, dim=0)
    per_cell = _giou_each(flat_pred, flat_tgt).reshape(n, cells)
    cell_giou = ((1.0 - per_cell) * heat).sum(dim=1).mean()
    g = giou_loss(pred, target)
    l1 = (pred - target).abs().sum(dim=1).mean()
    g_all = giou_loss(pred_all, target)
    loss = g + 2.0 * l1 + 0.5 * g_all + 0.3 * ce + 1.0 * cell_giou
    return loss, {"giou": float(g.detach()), "l1": float(l1.detach()), "ce": float(ce.detach())}


def _giou_each(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ix0, iy0 = torch.maximum(pred[:, 0], target[:, 0]), torch.maximum(pred[:, 1], target[:, 1])
    ix1, iy1 = torch.minimum(pred[:, 2], target[:, 2]), torch.minimum(pred[:, 3], target[:, 3])
    inter = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    union = area_p + area_t - inter + 1e-7
    cx0, cy0 = torch.minimum(pred[:, 0], target[:, 0]), torch.minimum(pred[:, 1], target[:, 1])
    cx1, cy1 = torch.maximum(pred[:, 2], target[:, 2]), torch.maximum(pred[:, 3], target[:, 3])
    hull = (cx1 - cx0) * (cy1 - cy0) + 1e-7
    return inter / union - (hull - union) / hull
