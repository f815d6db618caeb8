"""A classical, weight-free detector: the floor every learned detector must beat.

Saliency here is the colour distance of each pixel from the image's border colour (product photos
are mostly framed by background), combined with a spectral-residual map (Hou & Zhang, CVPR 2007)
that highlights the unexpected. The map is thresholded with Otsu's method; the connected component
with the highest total saliency gives the box. Images are analysed at a fixed small size.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image
from scipy import ndimage

from moon.regions.base import Detection, full_image_box

_VERSION = 1


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-9)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-9)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def _spectral_residual(gray: np.ndarray) -> np.ndarray:
    f = np.fft.fft2(gray)
    log_amp = np.log(np.abs(f) + 1e-8)
    phase = np.angle(f)
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode="nearest")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    sal = ndimage.gaussian_filter(sal, sigma=2.5)
    return sal / (sal.max() + 1e-12)


def saliency_map(image: Image.Image, size: int = 128) -> np.ndarray:
    """Saliency in [0, 1] of shape ``(size', size')`` (the image resized to fit ``size`` on its long side)."""
    w, h = image.size
    scale = size / max(w, h)
    small = image.convert("RGB").resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    border = np.concatenate(
        [rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)
    spread = np.median(np.abs(border - bg), axis=0).mean()
    dist = np.sqrt(((rgb - bg) ** 2).sum(-1))
    dist = ndimage.gaussian_filter(dist, sigma=1.0)
    dist = dist / (dist.max() + 1e-12)
    sr = _spectral_residual(rgb.mean(-1))
    # a uniform border (studio shot) makes colour distance reliable; a busy one shifts weight to SR
    alpha = float(np.clip(1.0 - spread * 8.0, 0.2, 1.0))
    return alpha * dist + (1.0 - alpha) * sr


class SaliencyDetector:
    """Border-contrast + spectral-residual saliency, Otsu threshold, best connected component."""

    name = "saliency"

    def __init__(self, size: int = 128):
        self.size = int(size)

    def fingerprint(self) -> str:
        spec = json.dumps({"name": self.name, "version": _VERSION, "size": self.size}, sort_keys=True)
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def detect(self, image: Image.Image, title: str | None = None) -> list[Detection]:
        """One box (the most salient blob), or the full image when the map is flat."""
        w, h = image.size
        sal = saliency_map(image, self.size)
        sh, sw = sal.shape
        if float(sal.max() - sal.min()) < 1e-6:
            return [Detection(full_image_box((w, h)), 0.0)]
        mask = sal > _otsu(sal)
        mask = ndimage.binary_closing(mask, iterations=2)
        labels, n = ndimage.label(mask)
        if n == 0:
            return [Detection(full_image_box((w, h)), 0.0)]
        mass = ndimage.sum(sal, labels, index=np.arange(1, n + 1))
        order = np.argsort(-mass)
        total = float(mass.sum()) or 1.0
        out = []
        for idx in order[:3]:
            ys, xs = np.nonzero(labels == idx + 1)
            box = (xs.min() * w / sw, ys.min() * h / sh, (xs.max() + 1) * w / sw, (ys.max() + 1) * h / sh)
            out.append(Detection(tuple(float(v) for v in box), float(mass[idx] / total)))
        return out
