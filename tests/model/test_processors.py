from moon.model.processors import QWEN2_VL_SPECIAL_TOKENS, image_processor, qwen2_tokenizer


def test_offline_tokenizer_gives_the_real_qwen2_ids():
    tok = qwen2_tokenizer()
    assert tok("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|im_start|>", "<|endoftext|>"])
    assert ids == [151655, 151652, 151644, 151643]
    assert tok.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS)) == list(range(151643, 151657))
    assert len(tok) == 151657


def test_image_processor_respects_max_pixels(images):
    proc = image_processor(min_pixels=56 * 56, max_pixels=112 * 112)
    out = proc(images=[images[3]], return_tensors="pt")  # 300 × 90
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and (h * 14) * (w * 14) <= 112 * 112
    assert out["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
