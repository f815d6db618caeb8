"""The graft backbone family: a pretrained image encoder → an MLP projector → visual tokens placed
into a pretrained causal LM's input embeddings (LLaVA-style), behind the same ``MoonEmbedder`` API
as the Qwen-VL family.

A product sequence looks exactly like the Qwen-VL one (instruction, then per image
``<image> v₁ … v_k </image>``, then the text template), where ``v₁ … v_k`` are the ``image_tokens``
visual tokens of one image: the encoder's feature map average-pooled to a √k × √k grid, each cell
projected into the LM's embedding space. The positions of visual tokens are the tokens tagged
``vision`` or ``crop`` (see :mod:`moon.model.inputs`), so no vocabulary entry is reserved for them.

With ``freeze_image_encoder`` (the default) the encoder never trains: its pooled features are
computed once per image while inputs are built and kept in a process-wide cache, keyed by the
encoder's weights and the image file, so training and evaluation pay for each image once.

Any transformers causal LM plugs in through :class:`GraftConfig` (``lm``: ``asset:NAME``, a local
directory or a hub id, or ``random`` with ``lm_config``); any encoder of
:mod:`moon.model.image_encoders` through ``image_encoder``.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moon.data import load_image
from moon.errors import ConfigError
from moon.model.backbone import hf_reason
from moon.model.config import GraftConfig
from moon.model.image_encoders import ImageEncoder, build_image_encoder
from moon.model.packed import PackedLayout, decoder_forward

LM_DIR = "lm"
VISION_DIR = "vision"


# --------------------------------------------------------------------------- the module


class GraftModel(nn.Module):
    """Image encoder + projector + causal LM (the base model, no LM head).

    ``forward`` returns the last hidden states ``(B, L, H)``.
    """

    def __init__(self, spec: GraftConfig, lm: nn.Module, encoder: ImageEncoder):
        super().__init__()
        self.spec = spec
        self.lm = lm
        self.vision = encoder
        hidden = int(lm.config.hidden_size)
        inner = spec.projector_hidden or hidden
        feat = encoder.feature_dim
        self.projector = nn.Sequential(nn.LayerNorm(feat), nn.Linear(feat, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.grid = math.isqrt(spec.image_tokens)
        self._calibrate_projector()
        if spec.freeze_image_encoder:
            self.vision.requires_grad_(False)
        self.frozen_features = FrozenImageFeatures(
            self.vision, self.grid, spec.feature_cache, precision=spec.image_precision
        )
        self.register_load_state_dict_post_hook(_forget_feature_key)

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @torch.no_grad()
    def _calibrate_projector(self) -> None:
        """Scale the projector's last layer so that visual tokens start at the RMS of the LM's own
        token embeddings (a projector far louder than the text would swamp the first layers)."""
        table = self.lm.get_input_embeddings().weight
        target = float(table.float().pow(2).mean().sqrt())
        probe = torch.randn(256, self.projector[0].normalized_shape[0])
        inner = self.projector[2](self.projector[1](self.projector[0](probe)))
        last = self.projector[3]
        last.bias.zero_()
        rms = float(last(inner).pow(2).mean().sqrt())
        if rms > 0 and math.isfinite(target) and target > 0:
            last.weight.mul_(target / rms)

    def train(self, mode: bool = True) -> GraftModel:
        super().train(mode)
        if self.spec.freeze_image_encoder:
            self.vision.eval()  # frozen: batch norms stay in eval mode
        return self

    # -- images ----------------------------------------------------------------------------
    def pooled_tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` → ``(N · k, D)`` visual-token features (average-pooled √k × √k grid)."""
        return pool_grid(feature_map, self.grid)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` pixels → ``(N · k, D)`` (through the encoder; gradients if it trains)."""
        return self.pooled_tokens(self.vision(pixels))

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor,
        payload: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Last hidden states ``(B, L, H)``.

        Args:
            input_ids / attention_mask: ``(B, L)``; ``image_mask`` ``(B, L)`` bool, True at visual tokens.
            payload: what the input builder made of the images: cached features ``(Σk, D)`` when the
                encoder is frozen, else flattened pixels ``(n_images, 3·S·S)``.
            features: ``(Σk, D)`` visual-token features given directly (overrides ``payload``).
            packed: run the LM on the real tokens only (:mod:`moon.model.packed`, after
                :func:`~moon.model.packed.install`; zeros at padding); ``False``: the padded LM forward.
        """
        layout = PackedLayout.from_mask(attention_mask) if packed else None
        if layout is not None:  # embed the real tokens only
            embeds = self.lm.get_input_embeddings()(layout.pack(input_ids))  # (1, T, H)
            image_mask = layout.pack(image_mask)
        else:
            embeds = self.lm.get_input_embeddings()(input_ids)
        if features is None and payload is not None:
            if self.spec.freeze_image_encoder:
                features = payload
            else:
                side = self.vision.image_size
                features = self.image_features(payload.reshape(-1, 3, side, side))
        n_slots = int(image_mask.sum())
        if features is not None or n_slots:
            n_feat = 0 if features is None else int(features.shape[0])
            if n_feat != n_slots:
                raise ValueError(f"graft: {n_slots} visual-token positions but {n_feat} visual tokens")
            ref = self.projector[1].weight
            visual = self.projector(features.to(device=ref.device, dtype=ref.dtype))
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype))
        if layout is not None:
            return layout.unpack(decoder_forward(self.lm, embeds, layout))
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


# --------------------------------------------------------------------------- image inputs


class _FeatureCache:
    """Process-wide LRU of frozen-encoder features: ``(vision_key, file key) → (k, D)`` float32."""

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: tuple, value: torch.Tensor, limit: int) -> None:
        if limit <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > limit:
            self.entries.popitem(last=False)


FEATURE_CACHE = _FeatureCache()


def _file_key(ref: Any) -> tuple | None:
    if isinstance(ref, (str, os.PathLike)):
        try:
            st = Path(ref).stat()
        except OSError:
            return None  # the loader raises its clear error
        return (str(Path(ref).resolve()), st.st_size, st.st_mtime_ns)
    return None


def _forget_feature_key(module: GraftModel, _keys: Any) -> None:
    module.frozen_features.invalidate()  # new encoder weights: a new cache namespace


def pool_grid(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, D, h, w)`` → ``(N · grid², D)``: the map average-pooled to ``grid × grid`` cells, row-major."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    return pooled.flatten(2).transpose(1, 2).reshape(-1, feature_map.shape[1])


class FrozenImageFeatures:
    """Pooled features of a frozen encoder, computed once per image: a process-wide LRU cache
    (namespaced by :meth:`key`: a hash of the encoder's weights, input size, grid and precision),
    and, when ``MOON_FEATURE_CACHE`` names a directory, an on-disk store keyed by the image's
    content (:mod:`moon.model.feature_store`) that later processes read instead of recomputing.

    The encoder runs in ``torch.inference_mode``, in batches of ``batch_size`` images (8: on a
    2-core oneDNN CPU, EfficientNet-Lite0 takes fewer ms per image at 4–8 than at 16–32, whose
    activations leave the cache), a conv encoder's pixels in ``channels_last`` layout (the same
    float32 features up to summation order, and faster on oneDNN CPUs); ``precision``
    (``graft.image_precision``) picks float32 or bfloat16 autocast. :meth:`prefetch` gathers
    the images of many records first, so that one-image queries are encoded in full batches too.
    (Decoding the next batch in a worker thread gained nothing on 2 cores, where the encoder's
    threads already use both: ``benchmarks/results/encode_path-*.md``.)
    """

    def __init__(self, encoder: ImageEncoder, grid: int, limit: int, batch_size: int = 8, precision: str = "fp32"):
        self.encoder = encoder
        self.grid = grid
        self.limit = limit
        self.batch_size = batch_size
        self.precision = precision
        self._key: str | None = None
        self._store: Any = False  # False: not looked up yet; None: no disk store

    def invalidate(self) -> None:
        """The encoder's weights changed (a checkpoint was loaded): a new cache namespace."""
        self._key = None
        self._store = False

    def _device(self) -> torch.device:
        param = next(self.encoder.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _bf16(self) -> bool:
        from moon.precision import resolve_bf16

        return resolve_bf16(self.precision, self._device())

    def key(self) -> str:
        if self._key is None:
            dtype = "bf16" if self._bf16() else "fp32"
            h = hashlib.sha256(f"{type(self.encoder).__name__}|{self.encoder.image_size}|{self.grid}|{dtype}".encode())
            for name, t in sorted(self.encoder.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self._key = h.hexdigest()[:16]
        return self._key

    def store(self):
        """The on-disk feature store (``MOON_FEATURE_CACHE``), or ``None`` when it is not set."""
        if self._store is False:
            from moon.model.feature_store import from_env

            self._store = from_env(self.key(), (self.grid * self.grid, self.encoder.feature_dim))
        return self._store

    def _lookup(
        self, refs: Sequence[Any]
    ) -> tuple[list[torch.Tensor | None], list[tuple[int, tuple | None, str | None]]]:
        """Cached features per ref (memory, then disk) and the refs still to compute, as
        ``(index, file key, content key)``."""
        vkey = self.key()
        store = self.store()
        out: list[torch.Tensor | None] = [None] * len(refs)
        todo: list[tuple[int, tuple | None, str | None]] = []
        for i, ref in enumerate(refs):
            fkey = _file_key(ref)
            hit = FEATURE_CACHE.get((vkey, fkey)) if fkey is not None else None
            ckey = None
            if hit is None and store is not None and fkey is not None:
                ckey = store.content_key(ref)
                hit = store.get(ckey) if ckey is not None else None
                if hit is not None:
                    FEATURE_CACHE.put((vkey, fkey), hit, self.limit)
            if hit is not None:
                out[i] = hit
            else:
                todo.append((i, fkey, ckey))
        return out, todo

    def _compute(self, refs: Sequence[Any], todo: list[tuple[int, tuple | None, str | None]], out: list) -> None:
        if not todo:
            return
        k = self.grid * self.grid
        vkey, store = self.key(), self.store()
        device = self._device()
        fmt = torch.channels_last if getattr(self.encoder, "channels_last", False) else torch.contiguous_format
        cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self._bf16())

        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = torch.stack([self.encoder.preprocess(load_image(refs[i])) for i, _, _ in chunk])
            with torch.inference_mode(), cast:
                fmap = self.encoder(batch.to(device).contiguous(memory_format=fmt)).float()
                feats = pool_grid(fmap, self.grid).cpu().reshape(len(chunk), k, -1)
            feats = feats.clone()  # outside inference mode: a normal tensor, usable in training
            for (i, fkey, ckey), f in zip(chunk, feats, strict=True):
                out[i] = f
                if fkey is not None:
                    FEATURE_CACHE.put((vkey, fkey), f, self.limit)
                if store is not None and bool(torch.isfinite(f).all()):
                    ckey = ckey or store.content_key(refs[i])
                    if ckey is not None:
                        store.put(ckey, f)

    def prefetch(self, refs: Sequence[Any]) -> None:
        """Compute (in full batches) and cache the features of ``refs`` not cached yet, so that
        the per-record calls that follow are cache hits."""
        unique = list(dict.fromkeys(r for r in refs if isinstance(r, (str, os.PathLike))))
        if len(unique) > self.limit:  # they would evict each other before use
            return
        out, todo = self._lookup(unique)
        self._compute(unique, todo, out)

    def __call__(self, refs: Sequence[Any]) -> torch.Tensor:
        """``(len(refs) · grid², D)`` float32 features, from the caches where possible."""
        if not refs:
            return torch.zeros((0, self.encoder.feature_dim))
        out, todo = self._lookup(refs)
        self._compute(refs, todo, out)
        return torch.cat(out)  # type: ignore[arg-type]


class GraftImageInputs:
    """Image references → the graft's payload and one ``(1, √k, √k)`` grid row per image
    (the role the Qwen2-VL image processor plays for the Qwen-VL family)."""

    def __init__(self, model: GraftModel):
        self.model = model

    def n_tokens(self, thw: Sequence[int]) -> int:
        return int(thw[0] * thw[1] * thw[2])

    def __call__(self, refs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        grid = torch.tensor([[1, m.grid, m.grid]] * len(refs), dtype=torch.long)
        if not m.spec.freeze_image_encoder:
            pixels = torch.stack([m.vision.preprocess(load_image(r)) for r in refs])
            return pixels.reshape(len(refs), -1), grid
        return m.frozen_features(refs), grid

    def prefetch(self, refs: Sequence[Any]) -> None:
        """Compute the frozen features of many images at once (full batches), ahead of the
        per-record calls; a no-op when the encoder trains (its pixels go through the model)."""
        if self.model.spec.freeze_image_encoder:
            self.model.frozen_features.prefetch(refs)


# --------------------------------------------------------------------------- building


def _lm_source(spec: GraftConfig) -> str:
    if spec.lm.startswith("asset:"):
        from moon.assets import lm_dir

        return str(lm_dir(spec.lm[len("asset:") :]))
    return spec.lm


def _truncate(lm: nn.Module, keep: int | None) -> None:
    if keep is None:
        return
    n = len(lm.layers)
    if keep > n:
        raise ConfigError(f"graft.keep_layers={keep}: the LM has only {n} decoder layers")
    lm.layers = lm.layers[:keep]
    lm.config.num_hidden_layers = keep
    types = getattr(lm.config, "layer_types", None)
    if isinstance(types, list) and len(types) > keep:
        lm.config.layer_types = types[:keep]


def _base_lm(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``LlamaModel`` inside ``LlamaForCausalLM`` …)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise ConfigError(f"{type(model).__name__}: not a decoder-only language model (no `layers`)")


def load_lm(spec: GraftConfig, *, seed: int) -> nn.Module:
    """The (truncated) base LM of ``spec``: pretrained weights, or random from ``lm_config``."""
    from transformers import AutoConfig, AutoModel

    if spec.lm == "random":
        cfg_dict = dict(spec.lm_config or {})
        model_type = cfg_dict.pop("model_type", None)
        if not model_type:
            raise ConfigError("graft.lm_config: needs a model_type (e.g. llama, qwen2)")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = _base_lm(AutoModel.from_config(config))
    else:
        source = _lm_source(spec)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"graft.lm={spec.lm!r}: not a loadable transformers language model ({hf_reason(exc)})"
            ) from exc
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"graft.lm={spec.lm!r}: an encoder-decoder model; the graft needs a decoder-only LM")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            lm = _base_lm(
                AutoModel.from_pretrained(
                    source, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
                )
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"graft.lm={spec.lm!r}: weights not loadable ({hf_reason(exc)})") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    _truncate(lm, spec.keep_layers)
    return lm.float()


def load_tokenizer_for(spec: GraftConfig, saved: str | os.PathLike | None = None):
    """The graft's tokenizer: the offline Qwen2 one, a saved one, or the LM's own."""
    from moon.model.processors import qwen2_tokenizer

    if spec.tokenizer == "qwen2-offline":
        return qwen2_tokenizer()
    from transformers import AutoTokenizer

    source = str(saved) if saved is not None else _lm_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"graft: no tokenizer at {source} ({hf_reason(exc)})") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def build_graft(spec: GraftConfig, *, seed: int) -> GraftModel:
    """A graft from pretrained parts (the projector is new, seeded by ``seed``)."""
    lm = load_lm(spec, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)  # a random encoder (tiny-cnn) and the projector are seeded too
        encoder = build_image_encoder(spec.image_encoder, image_size=spec.image_size, pretrained=True)
        model = GraftModel(spec, lm, encoder)
    return model.float()


def save_graft_config(model: GraftModel, directory: Path) -> None:
    """``directory/lm/config.json`` (the truncated LM) and, for ``hf:`` encoders, ``vision/``."""
    model.lm.config.save_pretrained(str(directory / LM_DIR))
    if model.spec.image_encoder.startswith("hf:"):
        model.vision.save_config(directory / VISION_DIR)  # type: ignore[attr-defined]


def build_saved_graft(spec: GraftConfig, directory: Path) -> GraftModel:
    """The architecture of a saved graft (weights come from its ``model.safetensors`` next)."""
    from transformers import AutoConfig, AutoModel

    lm_dir = directory / LM_DIR
    if not (lm_dir / "config.json").is_file():
        raise ConfigError(f"{directory}: {LM_DIR}/config.json is missing (not a saved graft backbone)")
    try:
        config = AutoConfig.from_pretrained(str(lm_dir), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{lm_dir}: not a loadable language-model config ({hf_reason(exc)})") from exc
    config._attn_implementation = "sdpa"
    lm = _base_lm(AutoModel.from_config(config))
    encoder_name = spec.image_encoder
    if encoder_name.startswith("hf:"):
        encoder_name = f"hf:{directory / VISION_DIR}"
    encoder = build_image_encoder(encoder_name, image_size=spec.image_size, pretrained=False)
    return GraftModel(spec, lm, encoder).float()


__all__ = [
    "FEATURE_CACHE",
    "FrozenImageFeatures",
    "GraftConfig",
    "GraftImageInputs",
    "GraftModel",
    "build_graft",
    "build_saved_graft",
    "load_lm",
    "load_tokenizer_for",
    "pool_grid",
]
