"""Input building: text template, aspect tags, image placeholders and the documented edge cases."""

import numpy as np
import pytest

from moon.data import Product, Query, product_text
from moon.errors import DataError
from moon.model import ASPECTS, TruncationWarning


def _aspect_text(emb, item, aspect):
    ids = item.input_ids[item.aspect_ids == ASPECTS.index(aspect)]
    return emb.tokenizer.decode(ids.tolist())


def test_product_text_is_the_shared_template(tiny, products):
    item = tiny.build_product_inputs([products[0]])[0]
    text_ids = item.input_ids[item.input_ids != tiny.inputs.markers.image_pad]
    decoded = tiny.tokenizer.decode(text_ids.tolist())
    expected = (
        tiny.config.product_instruction + "<|vision_start|><|vision_end|>" + product_text(products[0]) + "<|im_end|>"
    )
    assert decoded == expected


def test_aspect_tags_cover_the_right_tokens(tiny, products):
    p = products[1]
    item = tiny.build_product_inputs([p])[0]
    assert item.input_ids.shape == item.aspect_ids.shape
    assert _aspect_text(tiny, item, "category") == "Home > Kitchen > Mugs"
    assert _aspect_text(tiny, item, "attribute") == "color: blue; material: ceramic, clay"
    assert _aspect_text(tiny, item, "title") == p.title
    # image placeholders: one token per merged patch, tagged vision (3 images) or crop (1 crop)
    grid = item.image_grid_thw
    per_image = (grid.prod(-1) // 4).tolist()
    assert item.image_aspects == ["vision", "crop", "vision", "vision"]
    n_vision = int((item.aspect_ids == ASPECTS.index("vision")).sum())
    n_crop = int((item.aspect_ids == ASPECTS.index("crop")).sum())
    assert n_crop == per_image[1] and n_vision == sum(per_image) - per_image[1]
    assert int((item.input_ids == tiny.inputs.markers.image_pad).sum()) == sum(per_image)
    assert item.pixel_values.shape[0] == int(grid.prod(-1).sum())


def test_empty_category_and_attributes_are_omitted(tiny, images):
    item = tiny.build_product_inputs([Product("x", "plain", [images[0]])])[0]
    for aspect in ("category", "attribute"):
        assert not (item.aspect_ids == ASPECTS.index(aspect)).any()
    assert "Category" not in tiny.tokenizer.decode(item.input_ids.tolist())


def test_crops_are_skipped_when_disabled(tiny, products):
    from moon.model.inputs import InputBuilder

    builder = InputBuilder(tiny.config.replace(use_crops=False), tiny.tokenizer, tiny.inputs.images, tiny.inputs.markers)
    item = builder.product(products[1])
    assert item.image_aspects == ["vision"] * 3


def test_query_tags(tiny, queries):
    text_q, image_q, mm_q, _ = tiny.build_query_inputs(queries)
    assert _aspect_text(tiny, text_q, "query_text") == "red shoes"
    assert text_q.pixel_values is None
    assert image_q.image_aspects == ["vision"] and not (image_q.aspect_ids == ASPECTS.index("query_text")).any()
    assert _aspect_text(tiny, mm_q, "query_text") == queries[2].text and len(mm_q.image_aspects) == 2


def test_empty_query_is_a_clear_error(tiny):
    with pytest.raises(DataError, match="q0: has neither text nor images"):
        tiny.build_query_inputs([Query("q0", "  ")])


def test_too_many_images_are_truncated_with_a_warning(tiny, images):
    p = Product("many", "twenty images", [images[i % 5] for i in range(20)])
    with pytest.warns(TruncationWarning, match="many: 20 images > max_images=8"):
        item = tiny.build_product_inputs([p])[0]
    assert len(item.image_aspects) == 8
    with pytest.warns(TruncationWarning):
        assert tiny.encode_products([p]).shape == (1, tiny.dim)


def test_long_title_is_shortened_with_a_warning(tiny):
    p = Product("long", "x" * 10_000 + " tail", [], ["Toys", "Cars"], {"color": ["green"]})
    with pytest.warns(TruncationWarning, match="long: text has .* tokens > max_text_tokens"):
        item = tiny.build_product_inputs([p])[0]
    # no images: the sequence is instruction + text (cut to exactly the budget) + <|im_end|>
    n_instr = len(tiny.tokenizer(tiny.config.product_instruction, add_special_tokens=False)["input_ids"])
    assert len(item) - n_instr - 1 == tiny.config.max_text_tokens
    assert _aspect_text(tiny, item, "category") == "Toys > Cars"
    assert _aspect_text(tiny, item, "attribute") == "color: green"
    with pytest.warns(TruncationWarning):
        vec = tiny.encode_products([p])
    assert np.isfinite(vec).all()


def test_image_files_go_through_the_safe_loader(tiny, tmp_path, images):
    path = tmp_path / "a.png"
    images[0].save(path)
    from_file = tiny.build_product_inputs([Product("f", "t", [str(path)])])[0]
    from_pil = tiny.build_product_inputs([Product("f", "t", [images[0]])])[0]
    assert (from_file.pixel_values == from_pil.pixel_values).all()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        tiny.build_product_inputs([Product("b", "t", [str(bad)])])


def test_encoded_inputs_pickle_round_trip(tiny, products):
    import pickle

    items = tiny.build_product_inputs(products[:2])
    again = pickle.loads(pickle.dumps(items))
    for a, b in zip(items, again, strict=True):
        assert (a.input_ids == b.input_ids).all() and (a.aspect_ids == b.aspect_ids).all()
        assert (a.pixel_values == b.pixel_values).all() and a.image_aspects == b.image_aspects
