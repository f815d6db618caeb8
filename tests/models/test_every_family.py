"""Every registered family, built → saved → reloaded → indexed → the index reopened from its manifest
alone (no ``--model``), and the policy each family states is the one the index's reader applies."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moon.data import Product, Query, write_store
from moon.errors import ConfigError
from moon.index import build_index, make_query, read_manifest, search
from moon.index.build import load_index_embedder
from moon.index.references import manifest_model_spec
from moon.models import Family, families, get_family, load_embedder, parse_spec, register_family, unregister_family

#: how each family is built tiny here: (spec, overrides)
BUILDABLE = {
    "moon": ("moon-tiny", {}),
    "random": ("random:3", {}),
    "dual-encoder": (
        "dual-encoder",
        {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "patch": 16, "max_text_len": 16},
    ),
    "pretrained-towers": ("pretrained-towers", {"image_size": 64, "dim": 16}),
    "two-tower": ("two-tower:moon-graft-tiny", {}),
}
#: families that only load a checkpoint the user has (none is installed here), with the reason
USER_CHECKPOINT_ONLY = {"open-clip": "an open_clip checkpoint", "gme": "a GME-Qwen2-VL checkpoint"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    (root / "images").mkdir()
    products = []
    for colour, rgb in COLOURS.items():
        for item in ("shoe", "bag"):
            path = root / "images" / f"{colour}-{item}.png"
            Image.new("RGB", (32, 32), rgb).save(path)
            products.append(
                Product(id=f"{colour}-{item}", title=f"{colour} {item}", images=[path], category=["Fashion", item])
            )
    return write_store(root, products, [Query(id="q0", text="red shoe")], [])


def test_every_registered_family_is_covered_here():
    """A family added to the registry without a way to build it here (or a reason why not) fails."""
    assert set(families()) == set(BUILDABLE) | set(USER_CHECKPOINT_ONLY)


@pytest.mark.parametrize("family", sorted(BUILDABLE))
def test_build_save_reload_index_reopen(family, store, tmp_path):
    spec, overrides = BUILDABLE[family]
    assert parse_spec(spec).family == family
    built = load_embedder(spec, overrides=overrides)
    products = store.products()
    vectors = built.encode_products(products)
    assert vectors.shape == (len(products), built.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    if get_family(family).saved:
        model_spec = str(tmp_path / "saved")
        built.save_pretrained(model_spec)
        assert parse_spec(model_spec).source == "saved" and parse_spec(model_spec).family == family
        reloaded = load_embedder(model_spec)
        assert reloaded.fingerprint() == built.fingerprint()
        # the same weights: float32 on CPU, same inputs, same code → the same vectors up to summation order
        np.testing.assert_allclose(reloaded.encode_products(products), vectors, atol=1e-5)
    else:
        model_spec, reloaded = spec, built

    index_dir = tmp_path / "idx"
    build_index(reloaded, store, index_dir, model=model_spec)
    manifest = read_manifest(index_dir)
    # reopened with no --model: only the manifest's word, under the data-file policy
    assert manifest_model_spec(manifest, index_dir) in (model_spec, str((tmp_path / "saved").resolve()))
    reopened = load_index_embedder(manifest, None, index_dir=index_dir)  # checks the fingerprint
    assert reopened.fingerprint() == built.fingerprint()
    from moon.index import VectorIndex

    hits = search(VectorIndex.open(index_dir), reopened, make_query("red shoe"), k=3, store=store)
    assert len(hits) == 3 and {h.id for h in hits} <= {p.id for p in products}


@pytest.mark.parametrize("family", sorted(USER_CHECKPOINT_ONLY))
def test_user_checkpoint_families_are_refused_from_a_manifest(family, tmp_path):
    from moon.index.references import manifest_model_spec as reader

    class Manifest:
        model = f"{family}:some-checkpoint"
        model_relative = None
        version = 2

    with pytest.raises(ConfigError, match="does not load on a data file's word"):
        reader(Manifest(), tmp_path)


def test_trainable_is_checked_against_the_family_and_the_object():
    assert load_embedder("dual-encoder", trainable=True, overrides=BUILDABLE["dual-encoder"][1]) is not None
    with pytest.raises(ConfigError, match="'random' family cannot be trained"):
        load_embedder("random", trainable=True)
    register_family(Family("plain", lambda arg: load_embedder("random"), trainable=True))
    try:
        with pytest.raises(ConfigError, match="is not trainable.*missing"):
            load_embedder("plain", trainable=True)
    finally:
        unregister_family("plain")


def test_trust_remote_code_reaches_only_families_that_declare_it(tmp_path):
    seen = {}

    def loader(arg, **options):
        seen[arg] = options
        return load_embedder("random")

    register_family(Family("careful", loader))
    register_family(Family("coded", loader, remote_code=True))
    try:
        load_embedder("careful:a", trust_remote_code=True)
        load_embedder("coded:b", trust_remote_code=True)
        load_embedder("coded:c")
    finally:
        unregister_family("careful")
        unregister_family("coded")
    assert seen == {"a": {}, "b": {"trust_remote_code": True}, "c": {}}


def test_py_specs_only_with_the_callers_consent():
    with pytest.raises(ConfigError, match="runs Python code"):
        load_embedder("py:os:getcwd")
    with pytest.raises(ConfigError, match="cannot import"):
        load_embedder("py:no_such_module_here:make", allow_python=True)


def test_a_family_name_with_a_colon_is_refused():
    with pytest.raises(ConfigError, match="contain no ':'"):
        register_family(Family("a:b", lambda arg: None))
