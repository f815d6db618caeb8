"""Pooling modes, with known answers: ``mean``, ``last`` and ``modality`` (visual and text tokens
pooled apart, each L2-normalised, mixed by ``pooling_image_weight``)."""

import pytest
import torch
import torch.nn.functional as F

from moon.errors import ConfigError
from moon.model import ASPECTS, MoonConfig, MoonEmbedder
from moon.model.pooling import pool

V, C, T, TITLE = ASPECTS.index("vision"), ASPECTS.index("crop"), ASPECTS.index("template"), ASPECTS.index("title")


def _batch():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=gen)
    # row 0: 2 visual (vision, crop) + 2 text tokens + padding; row 1: text only; row 2: visual only
    tags = torch.tensor([[T, V, C, TITLE, -1], [T, TITLE, TITLE, -1, -1], [V, V, V, -1, -1]])
    mask = (tags >= 0).long()
    hidden[mask == 0] = 1e6  # padding must not count
    return hidden, mask, tags


def test_mean_and_last_known_answers():
    hidden, mask, _ = _batch()
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "last")[1], hidden[1, 2])


@pytest.mark.parametrize("w", [0.5, 0.8])
def test_modality_pooling_mixes_the_normalised_visual_and_text_means(w):
    hidden, mask, tags = _batch()
    got = pool(hidden, mask, "modality", aspect_ids=tags, image_weight=w)
    vis0, txt0 = F.normalize(hidden[0, 1:3].mean(0), dim=0), F.normalize(hidden[0, [0, 3]].mean(0), dim=0)
    torch.testing.assert_close(got[0], w * vis0 + (1 - w) * txt0)
    torch.testing.assert_close(got[1], F.normalize(hidden[1, :3].mean(0), dim=0))  # text only: that side alone
    torch.testing.assert_close(got[2], F.normalize(hidden[2, :3].mean(0), dim=0))  # visual only
    with pytest.raises(ValueError, match="needs the batch's aspect_ids"):
        pool(hidden, mask, "modality")


def test_modality_pooling_config():
    with pytest.raises(ConfigError, match="pooling_image_weight=1.0"):
        MoonConfig(pooling="modality", pooling_image_weight=1.0)
    assert "pooling_image_weight" not in MoonConfig().to_dict()  # unused: older fingerprints unchanged
    assert MoonConfig(pooling="modality").to_dict()["pooling_image_weight"] == 0.5


def test_a_modality_pooled_model_saves_and_reloads_with_the_same_vectors(products, queries, tmp_path):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", pooling="modality", pooling_image_weight=0.7)
    mean = MoonEmbedder.from_pretrained("moon-tiny", device="cpu")
    vecs = emb.encode_products(products)
    assert abs(vecs - mean.encode_products(products)).max() > 1e-3  # a different vector than mean pooling
    emb.save_pretrained(str(tmp_path / "m"))
    back = MoonEmbedder.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert back.config.pooling == "modality" and back.config.pooling_image_weight == 0.7
    torch.testing.assert_close(torch.from_numpy(back.encode_products(products)), torch.from_numpy(vecs))
    torch.testing.assert_close(
        torch.from_numpy(back.encode_queries(queries)), torch.from_numpy(emb.encode_queries(queries))
    )
