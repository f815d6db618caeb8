"""A transformers-saved Qwen-VL checkpoint loads through the same path a hub id takes."""

import numpy as np
import pytest
import torch

from moon.model import MoonEmbedder
from moon.model.backbone import backbone_config_from_dict
from moon.model.config import PRESETS
from moon.model.processors import qwen2_tokenizer


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_transformers_checkpoint_loads_like_a_hub_id(family, tmp_path, products):
    import transformers

    spec = dict(PRESETS["moon-tiny"][0])
    if family == "qwen2_vl":
        spec["model_type"] = "qwen2_vl"
        spec["vision_config"] = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    config = backbone_config_from_dict(spec)
    cls = {
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    }[family]
    torch.manual_seed(3)
    reference = cls(config).eval()
    reference.save_pretrained(tmp_path / "ckpt")
    if family == "qwen2_5_vl":  # the other one exercises the offline-tokenizer fallback
        qwen2_tokenizer().save_pretrained(tmp_path / "ckpt")

    emb = MoonEmbedder.from_pretrained(str(tmp_path / "ckpt"), device="cpu", moe_mode="dense")
    assert emb.name == str(tmp_path / "ckpt") and emb.dim == 64
    torch.testing.assert_close(
        emb.backbone.language_model.embed_tokens.weight, reference.model.language_model.embed_tokens.weight
    )
    # same hidden states as the checkpoint's own model on the same batch
    batch = emb.collate(emb.build_product_inputs(products[:2]))
    with torch.no_grad():
        ours = emb.hidden_states(batch)
        mm = (batch["input_ids"] == config.image_token_id).long()
        theirs = reference.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=mm,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert (ours[mask] - theirs[mask]).abs().max() < 1e-5
    # and the guided-MoE version of it starts out identical
    moe = MoonEmbedder.from_pretrained(str(tmp_path / "ckpt"), device="cpu")
    np.testing.assert_allclose(moe.encode_products(products), emb.encode_products(products), atol=1e-5)


def test_unknown_name_is_a_clear_error(tmp_path):
    from moon.errors import ConfigError

    with pytest.raises(ConfigError, match="not a preset"):
        MoonEmbedder.from_pretrained(str(tmp_path / "nothing-here"), device="cpu")


def test_qwen3_vl_checkpoint_works_where_transformers_has_it(tmp_path, products):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL")
    config = transformers.Qwen3VLConfig(
        text_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 151936, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5e6,
                                "mrope_interleaved": True},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "deepstack_visual_indexes": [1],
            "num_position_embeddings": 64,
        },
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3VLForConditionalGeneration(config).save_pretrained(tmp_path / "q3")
    emb = MoonEmbedder.from_pretrained(str(tmp_path / "q3"), device="cpu")
    batched = emb.encode_products(products)
    alone = np.concatenate([emb.encode_products([p]) for p in products])
    assert batched.shape == (len(products), 64) and np.abs(batched - alone).max() <= 1e-4
    counts = emb.routing_stats()[0]["counts"]
    from moon.model import ASPECTS, EXPERTS

    assert counts[ASPECTS.index("category"), EXPERTS.index("category")] > 0
