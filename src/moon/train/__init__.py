"""Contrastive training of any :class:`moon.models.TrainableEmbedder` on purchases.

``moon train`` wraps :func:`train`; the pieces are reusable on their own: the config
(:mod:`moon.train.config`), batches following the query modality mix (:mod:`moon.train.sampler`),
negatives and the false-negative guard (:mod:`moon.train.negatives`), the memory queue
(:mod:`moon.train.memory`), chunked GradCache encoding (:mod:`moon.train.chunked`), one step's
forward/backward (:mod:`moon.train.step`), checkpoints (:mod:`moon.train.checkpoints`) and
process-group helpers (:mod:`moon.train.distributed`).
"""

from __future__ import annotations

from moon.train.config import PRESETS, TrainConfig, load_config
from moon.train.loop import train
from moon.train.tuning import build_trainable

__all__ = ["PRESETS", "TrainConfig", "build_trainable", "load_config", "train"]
