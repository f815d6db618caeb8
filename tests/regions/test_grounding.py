"""Smoke test of the grounding detector on a tiny random-init Qwen2.5-VL (its answers are garbage)."""

import pytest
from PIL import Image

from moon.regions import load_detector
from moon.regions.grounding import qwen2_tokenizer


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
    )
    path = tmp_path_factory.mktemp("qwen") / "tiny"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def test_offline_tokenizer_has_qwen2_vl_ids():
    tok = qwen2_tokenizer()
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644


@pytest.mark.slow
def test_random_model_answers_fall_back_to_full_image_and_are_counted(tiny_qwen_dir):
    det = load_detector("grounding", tiny_qwen_dir, max_new_tokens=8, max_pixels=112 * 112)
    assert det.family == "qwen2.5-vl" and det.frame == "absolute"
    image = Image.new("RGB", (120, 90), (250, 250, 250))
    dets = det.detect(image, "red sneaker 运动鞋")
    assert isinstance(det.last_answer, str)
    if det.stats["fallback"]:
        assert dets[0].box == (0.0, 0.0, 120.0, 90.0) and dets[0].score == 0.0
    else:  # a random model could, in principle, emit a valid box: it must then lie in the image
        x0, y0, x1, y1 = dets[0].box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90
    assert det.stats["images"] == 1 and det.stats["fallback"] + det.stats["parsed"] == 1
    assert det.fingerprint() == det.fingerprint()
