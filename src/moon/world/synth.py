"""``synthesize``: generate the offline product world as a product store.

The catalogue is streamed family by family (one model drawing or photo, 1–5 sibling variants,
some sold by a second seller as a duplicate listing), so memory stays flat for 100k products.
Every random draw comes from a ``numpy`` generator seeded by ``(seed, purpose, index)``: the same
seed gives a byte-identical store, whatever ran before.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moon import progress
from moon.data import Box, Product, ProductStore, Purchase, Query, StoreError, StoreWriter
from moon.errors import ConfigError
from moon.world import shots, text
from moon.world.appearance import product_layer, recolor
from moon.world.attributes import COLORS, SIZE_SCALE, Variant, plan_family
from moon.world.sources import SpriteCache, background_photos, clipart_models, fashion_mnist, fashion_sprite
from moon.world.taxonomy import FASHION_CLASSES

SPLIT_NAMES = ("train", "val", "test")
MODALITIES = ("image", "text", "multimodal")
REGIONS = ("CN-East", "CN-South", "CN-North", "CN-West", "SEA", "EU", "NA")
REGION_WEIGHTS = (0.3, 0.22, 0.15, 0.08, 0.12, 0.07, 0.06)
YEAR_START = 1704067200  # 2024-01-01T00:00:00Z
YEAR_DAYS = 366
#: the most products one world may have (a typo such as 2e11 would otherwise run for days)
MAX_PRODUCTS = 1_000_000
#: seeds are 32-bit, as ``run.seed`` of a training config
MAX_SEED = 2**32 - 1
#: the most worker processes ``synthesize(workers=…)`` starts
MAX_WORKERS = 256


@dataclass(frozen=True)
class Profile:
    """Size knobs of a world profile."""

    min_images: int
    max_images: int
    queries_per_product: float


PROFILES: dict[str, Profile] = {
    "small": Profile(min_images=3, max_images=4, queries_per_product=1.5),
    "default": Profile(min_images=3, max_images=6, queries_per_product=2.5),
    "large": Profile(min_images=4, max_images=6, queries_per_product=4.0),
}


@dataclass(frozen=True)
class WorldParams:
    """Everything that shapes a world (recorded in the manifest's ``created.params``)."""

    n_products: int = 2000
    profile: str = "default"
    fashion_share: float = 0.25
    duplicate_rate: float = 0.12
    held_out_leaf_fraction: float = 0.04
    cold_product_fraction: float = 0.05
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    train_modality_mix: tuple[int, int, int] = (12, 3, 2)  # image : text : multimodal
    eval_modality_mix: tuple[int, int, int] = (1, 1, 1)
    image_size: int = shots.SIDE

    def check(self) -> None:
        if not 1 <= self.n_products <= MAX_PRODUCTS:
            raise ConfigError(f"n_products must be in [1, {MAX_PRODUCTS:,}] (got {self.n_products:,})")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        for name in ("fashion_share", "duplicate_rate", "held_out_leaf_fraction", "cold_product_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1] (got {v})")
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ConfigError(f"split_fractions must be ≥ 0 and sum to 1 (got {self.split_fractions})")
        for name in ("train_modality_mix", "eval_modality_mix"):
            mix = getattr(self, name)
            if len(mix) != 3 or any(m < 0 for m in mix) or sum(mix) <= 0:
                raise ConfigError(f"{name} must be three non-negative weights image:text:multimodal (got {mix})")


def _hex(*parts: Any, n: int = 16) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()[:n]


def _rng(seed: int, purpose: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *index])


def _probs(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _day_weights() -> np.ndarray:
    day = np.arange(YEAR_DAYS, dtype=np.float64)
    w = 1.0 + 0.25 * np.sin(day / YEAR_DAYS * 2 * np.pi * 4)  # monthly rhythm
    w += 4.0 * np.exp(-((day - 315) ** 2) / 8.0)  # 11.11
    w += 2.0 * np.exp(-((day - 352) ** 2) / 30.0)  # December
    w += 1.5 * np.exp(-((day - 170) ** 2) / 10.0)  # 6.18
    return w / w.sum()


@dataclass
class _Model:
    """The look of a family: a drawing or a Fashion-MNIST photo, and its category path."""

    key: str
    noun: str
    category: tuple[str, str, str, str]
    clipart_path: str | None = None
    fashion_index: int | None = None


class _Catalog:
    """Draws families: a model, sibling variants, duplicate listings. Holds only small lookup tables."""

    def __init__(self, params: WorldParams, seed: int):
        self.params = params
        self.seed = seed
        models = clipart_models()
        self.by_noun: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            self.by_noun.setdefault(m.noun, []).append(i)
        self.nouns = sorted(self.by_noun)
        self.models = models
        images, labels = fashion_mnist()
        self.fashion_images = images
        self.fashion_by_class = [np.flatnonzero(labels == c) for c in range(len(FASHION_CLASSES))]
        leaves = sorted({models[i].category for i in range(len(models))} | set(FASHION_CLASSES))
        rng = _rng(seed, 0)
        k = max(2, round(params.held_out_leaf_fraction * len(leaves))) if params.held_out_leaf_fraction > 0 else 0
        self.held_out = {leaves[int(i)] for i in rng.choice(len(leaves), size=k, replace=False)}

    def model(self, family: int) -> _Model:
        rng = _rng(self.seed, 1, family)
        if rng.random() < self.params.fashion_share:
            label = int(rng.integers(len(FASHION_CLASSES)))
            pool = self.fashion_by_class[label]
            idx = int(pool[int(rng.integers(len(pool)))])
            path = FASHION_CLASSES[label]
            return _Model(f"fmnist-{idx}", path[-1], path, fashion_index=idx)
        noun = self.nouns[int(rng.integers(len(self.nouns)))]
        choices = self.by_noun[noun]
        m = self.models[choices[int(rng.integers(len(choices)))]]
        return _Model(Path(m.path).name, m.noun, m.category, clipart_path=m.path)

    def variants(self, family: int, model: _Model) -> list[tuple[int, Variant, int]]:
        """``(variant index, variant, number of listings)`` of a family."""
        rng = _rng(self.seed, 2, family)
        n = int(rng.choice(5, p=[0.3, 0.25, 0.2, 0.15, 0.1])) + 1
        plan = plan_family(rng, model.category[0], n)
        return [(v, var, 2 if rng.random() < self.params.duplicate_rate else 1) for v, var in enumerate(plan.variants)]


class _Renderer:
    """Holds the decoded sources (bounded) and turns models + variants into pictures."""

    def __init__(self, catalog: _Catalog, seed: int, cache_items: int = 192):
        self.catalog = catalog
        self.cache = SpriteCache(cache_items)
        self.photos = [arr for _, arr in background_photos()]
        rng = _rng(seed, 5)
        pool = rng.choice(len(catalog.models), size=min(48, len(catalog.models)), replace=False)
        self.distractor_sprites = [_shrink(self.cache.get(catalog.models[int(i)].path), 112) for i in sorted(pool)]
        self.surfaces = shots.surface_bank(_rng(seed, 7))
        self._layers: dict[tuple[str, int, int], np.ndarray] = {}

    def sprite(self, model: _Model) -> np.ndarray:
        if model.fashion_index is not None:
            return fashion_sprite(self.catalog.fashion_images[model.fashion_index])
        assert model.clipart_path is not None
        return self.cache.get(model.clipart_path)

    def layer(self, model: _Model, variant: Variant, family: int, v: int) -> np.ndarray:
        key = (model.key, family, v)
        hit = self._layers.get(key)
        if hit is None:
            hit = product_layer(self.sprite(model), variant, _rng(self.catalog.seed, 4, family, v))
            self._layers = {key: hit}  # keep only the current item: duplicates follow each other
        return hit

    def lookalike(self, model: _Model, variant: Variant, rng: np.random.Generator) -> np.ndarray:
        """The same model in another colour (a sibling-like object for scene shots), RGBA."""
        sprite = _shrink(self.sprite(model), 112)
        colors = [c for c in COLORS if c != variant.color]
        rgb = recolor(sprite, colors[int(rng.integers(len(colors)))])
        return np.dstack([np.clip(rgb, 0, 255), sprite[..., 3]]).astype(np.uint8)

    def distractors(self, rng: np.random.Generator, lo: int, hi: int) -> list[np.ndarray]:
        n = int(rng.integers(lo, hi + 1))
        picks = rng.choice(len(self.distractor_sprites), size=n, replace=False)
        return [self.distractor_sprites[int(i)] for i in picks]


def _shrink(rgba: np.ndarray, side: int) -> np.ndarray:
    """A sprite downscaled so its longest side is at most ``side``."""
    h, w = rgba.shape[:2]
    if max(h, w) <= side:
        return rgba
    s = side / max(h, w)
    return np.asarray(Image.fromarray(rgba, "RGBA").resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


def _save(shot: shots.Shot, root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.image.save(path, "JPEG", quality=shot.jpeg_quality)


def _listing_kinds(rng: np.random.Generator, profile: Profile) -> list[str]:
    n = int(rng.integers(profile.min_images, profile.max_images + 1))
    extra = ["scene", "banner", "detail", "scene", "scene"]
    picked = [extra[int(i)] for i in rng.permutation(len(extra))[: n - 2]]
    return ["clean", "scene", *picked]


def assign_split_modality(
    rng: np.random.Generator, params: WorldParams, *, held_out: bool, cold: bool
) -> tuple[str, str]:
    """Split and modality of one query.

    Queries of held-out-leaf products go to ``test``; those of cold products to ``val``/``test``;
    the rest by ``split_fractions``. Train queries follow ``train_modality_mix`` (12:3:2), val/test
    ``eval_modality_mix``.
    """
    if held_out:
        split = "test"
    elif cold:
        split = "val" if rng.random() < 0.5 else "test"
    else:
        split = SPLIT_NAMES[int(rng.choice(3, p=_probs(params.split_fractions)))]
    mix = params.train_modality_mix if split == "train" else params.eval_modality_mix
    return split, MODALITIES[int(rng.choice(3, p=_probs(mix)))]


@dataclass
class _Listing:
    """One product listing to render: where it sits in the catalogue."""

    index: int
    family: int
    v: int
    variant: Variant
    model: _Model
    group: str | None
    held_out: bool


@dataclass
class _Rendered:
    product: Product
    boxes: list[Box]
    queries: list[Query]
    purchases: list[Purchase]


def _plan(catalog: _Catalog, seed: int, n_products: int) -> Iterator[_Listing]:
    """The catalogue, listing by listing (families of siblings, duplicates next to their original)."""
    index = family = 0
    while index < n_products:
        model = catalog.model(family)
        held = model.category in catalog.held_out
        for v, variant, n_listings in catalog.variants(family, model):
            group = f"g{_hex(seed, 'item', family, v, n=12)}" if n_listings > 1 else None
            for _ in range(n_listings):
                if index >= n_products:
                    return
                yield _Listing(index, family, v, variant, model, group, held)
                index += 1
        family += 1


class _World:
    """Everything one process needs to render listings into ``root``."""

    def __init__(self, root: Path, params: WorldParams, seed: int):
        self.root = root
        self.params = params
        self.seed = seed
        self.profile = PROFILES[params.profile]
        self.catalog = _Catalog(params, seed)
        self.renderer = _Renderer(self.catalog, seed)
        self.day_p = _day_weights()

    def render(self, li: _Listing) -> _Rendered:
        seed, root, renderer = self.seed, self.root, self.renderer
        model, variant = li.model, li.variant
        layer = renderer.layer(model, variant, li.family, li.v)
        rng = _rng(seed, 3, li.index)
        pid = _hex(seed, "product", li.index)
        shop = text.shop_name(rng)
        images: list[str] = []
        boxes: list[Box] = []
        for k, kind in enumerate(_listing_kinds(rng, self.profile)):
            if kind == "clean":
                shot = shots.clean_shot(layer, SIZE_SCALE[variant.size], rng)
            elif kind == "scene":
                twin = renderer.lookalike(model, variant, rng) if rng.random() < 0.3 else None
                shot = shots.scene_shot(
                    layer, renderer.photos, renderer.surfaces, renderer.distractors(rng, 2, 4), rng, twin
                )
            elif kind == "banner":
                shot = shots.banner_shot(layer, shop, text.price(rng), rng)
            else:
                shot = shots.detail_shot(layer, rng)
            rel = f"images/p/{pid[:2]}/{pid}_{k}.jpg"
            _save(shot, root, rel)
            images.append(rel)
            boxes.append(Box(rel, *map(float, shot.box), source="truth", kind=shot.kind))
        product = Product(
            id=pid,
            title=text.title(model.noun, model.category, variant, rng),
            images=images,
            category=list(model.category),
            attributes=variant.as_attributes(),
            group=li.group,
        )
        cold = (not li.held_out) and rng.random() < self.params.cold_product_fraction
        popularity = float(rng.pareto(2.5) + 0.4) / 1.07  # long tail, mean ≈ 1
        n_queries = int(rng.poisson(self.profile.queries_per_product * popularity))
        queries: list[Query] = []
        purchases: list[Purchase] = []
        for j in range(n_queries):
            qrng = _rng(seed, 6, li.index, j)
            split, modality = assign_split_modality(qrng, self.params, held_out=li.held_out, cold=cold)
            qid = "q" + _hex(seed, "query", li.index, j)
            q_text = None
            q_images: list[str] = []
            if modality in ("image", "multimodal"):
                photo = shots.query_photo(
                    layer, renderer.photos, renderer.surfaces, renderer.distractors(qrng, 0, 2), qrng
                )
                rel = f"images/q/{qid[1:3]}/{qid}.jpg"
                _save(photo, root, rel)
                q_images.append(rel)
                boxes.append(Box(rel, *map(float, photo.box), source="truth", kind="query"))
            if modality == "text":
                q_text = text.search_text(model.noun, model.category, variant, qrng)
            elif modality == "multimodal":
                q_text = text.short_hint(variant, qrng)
            queries.append(Query(id=qid, text=q_text, images=q_images, split=split))
            day = int(qrng.choice(YEAR_DAYS, p=self.day_p))
            ts = YEAR_START + day * 86400 + int(qrng.integers(86400))
            region = REGIONS[int(qrng.choice(len(REGIONS), p=REGION_WEIGHTS))]
            purchases.append(Purchase(qid, pid, ts, region))
        return _Rendered(product, boxes, queries, purchases)


_WORKER: _World | None = None


def _init_worker(root: Path, params: WorldParams, seed: int) -> None:
    global _WORKER
    _WORKER = _World(root, params, seed)


def _render_in_worker(li: _Listing) -> _Rendered:
    assert _WORKER is not None
    return _WORKER.render(li)


def _make_pool(world: _World, n_workers: int):
    """A process pool whose workers hold a ``_World``: inherited by fork where possible, else rebuilt."""
    global _WORKER
    if "fork" in multiprocessing.get_all_start_methods():
        _WORKER = world
        return multiprocessing.get_context("fork").Pool(n_workers)
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(n_workers, initializer=_init_worker, initargs=(world.root, world.params, world.seed))


def _close_pool(pool) -> None:
    global _WORKER
    pool.terminate()
    pool.join()
    _WORKER = None


def _windows(items: Iterator[_Listing], size: int) -> Iterator[list[_Listing]]:
    window: list[_Listing] = []
    for it in items:
        window.append(it)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def synthesize(
    out_dir: str | Path,
    *,
    n_products: int = 2000,
    seed: int = 0,
    profile: str = "default",
    show_progress: bool = True,
    overwrite: bool = False,
    params: WorldParams | None = None,
    workers: int | None = None,
) -> ProductStore:
    """Generate the product world into ``out_dir`` and open it.

    Writes products (3–6 JPEG images each, 224×224), queries (text, image, multimodal), purchases
    and ``boxes.parquet`` (``source="truth"``, one box per listing and query image, with its kind).
    The same arguments give a byte-identical store, whatever ``workers`` is (processes rendering in
    parallel; default: up to 2). ``params`` overrides the finer knobs (its ``n_products`` and
    ``profile`` are replaced by the arguments).

    With ``overwrite`` an existing store is replaced only once the new world is complete: it is
    built in a hidden sibling folder (``.NAME.moon-synth-…``) and swapped into place, so a failure
    midway (an error, Ctrl-C) leaves the old store as it was.
    """
    # every argument is checked before anything is written (or an old world replaced)
    for name, value in (("n_products", n_products), ("seed", seed), ("workers", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ConfigError(f"{name} must be a whole number (got {value!r})")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED:,}] (got {seed:,})")
    base = params or WorldParams()
    params = WorldParams(**{**asdict(base), "n_products": int(n_products), "profile": profile})
    params.check()
    # automatic: up to 2 processes, none for tiny worlds; an explicit ``workers`` is obeyed
    n_workers = (_default_workers() if n_products >= 32 else 1) if workers is None else int(workers)
    if not 1 <= n_workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be in [1, {MAX_WORKERS}] (got {workers})")
    root = Path(out_dir)
    if (root / "manifest.json").exists() and not overwrite:
        raise StoreError(f"{root}: a store already exists here (use --overwrite / overwrite=True to replace it)")
    if not (overwrite and (root / "manifest.json").exists()):
        _write_world(root, params, seed, n_workers, show_progress, overwrite=overwrite)
        return ProductStore(root)
    # replacing a store: build the new world next to it, swap it in only when it is complete
    real = Path(os.path.realpath(root))
    staging = real.parent / f".{real.name}{SYNTH_STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_world(staging, params, seed, n_workers, show_progress, overwrite=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the old store was never touched
        raise
    _swap_in(staging, real)
    return ProductStore(root)


#: marks the hidden sibling folders a replacing ``synthesize`` builds in (and moves the old world to)
SYNTH_STAGING_MARK = ".moon-synth-"


def _write_world(root: Path, params: WorldParams, seed: int, n_workers: int, show_progress: bool, *, overwrite: bool):
    """Render the world and write its store into ``root`` (images straight into ``root/images``)."""
    world = _World(root, params, seed)
    from moon import __version__

    created = {
        "tool": "moon.world",
        "version": __version__,
        "seed": int(seed),
        "params": {
            **asdict(params),
            "held_out_leaves": sorted(" > ".join(c) for c in world.catalog.held_out),
            "distractor_pool": len(world.renderer.distractor_sprites),
        },
    }
    # fork the workers first, before the progress bar's and the parquet writer's threads exist
    pool = _make_pool(world, n_workers) if n_workers > 1 else None
    bar = progress.bar(params.n_products, "synth", enabled=show_progress, unit="product")
    try:
        with StoreWriter(root, created=created, overwrite=overwrite) as writer:
            for window in _windows(_plan(world.catalog, seed, params.n_products), 256):
                results = pool.imap(_render_in_worker, window, chunksize=8) if pool else map(world.render, window)
                for r in results:
                    writer.add_product(r.product)
                    for b in r.boxes:
                        writer.add_box(b)
                    for q in r.queries:
                        writer.add_query(q)
                    for pu in r.purchases:
                        writer.add_purchase(pu)
                    bar.update(1)
    finally:
        if pool is not None:
            _close_pool(pool)
        bar.close()


def _swap_in(new: Path, root: Path) -> None:
    """Put the complete store ``new`` in the place of the store ``root`` (two renames), keep what
    the old folder held besides the store (the old ``images/`` and tables are dropped), then
    delete the old world. If a rename fails, the old store is put back (or its place is named)."""
    old = root.parent / f".{root.name}{SYNTH_STAGING_MARK}old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.chmod(new, stat.S_IMODE(os.stat(root).st_mode))
        os.replace(root, old)
    except OSError as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise StoreError(f"{root}: could not move the old store aside ({exc}); it is unchanged") from exc
    try:
        os.replace(new, root)
    except OSError as exc:
        try:
            os.replace(old, root)
        except OSError:
            raise StoreError(
                f"{root}: could not move the new store into place ({exc}); the old store is in {old}, the new in {new}"
            ) from exc
        shutil.rmtree(new, ignore_errors=True)
        raise StoreError(
            f"{root}: could not move the new store into place ({exc}); the old store is unchanged"
        ) from exc
    for entry in sorted(old.iterdir()):  # the user's own files in the folder stay
        target = root / entry.name
        if entry.name != "images" and not (target.exists() or target.is_symlink()):
            try:
                os.replace(entry, target)
            except OSError as exc:
                raise StoreError(
                    f"{root}: the new store is in place, but {entry} could not be moved back ({exc})"
                ) from exc
    shutil.rmtree(old, ignore_errors=True)
