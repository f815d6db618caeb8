"""The real SmolLM2-135M asset (installed by ``make setup``): the converted safetensors equal the
GGUF file's own dequantised tensors, and the pretrained graft retrieves zero-shot above chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moon.assets import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import os

    old = os.environ.get("MOON_CACHE")
    os.environ["MOON_CACHE"] = str(tmp_path_factory.mktemp("moon-cache"))  # convert here, not in ~/.cache
    try:
        yield registry.lm_dir("smollm2-135m")
    finally:
        if old is None:
            os.environ.pop("MOON_CACHE", None)
        else:
            os.environ["MOON_CACHE"] = old


# GGUF tensor name → transformers name; q/k are stored permuted for llama.cpp's rotary layout and
# un-permuted by transformers, so compare tensors that are stored as they are used
PAIRS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.17.ffn_gate.weight": "model.layers.17.mlp.gate_proj.weight",
    "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
    "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
    "output_norm.weight": "model.norm.weight",
}


def test_converted_weights_equal_the_gguf_dequantised_tensors(converted):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    (gguf_path,) = registry.verify("smollm2-135m")  # sha256 of the installed file checked too
    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    state = load_file(str(converted / "model.safetensors"))
    assert len(state) >= 30 * 9  # every layer's weights were written, not only the few compared
    quantised = 0
    for gguf_name, hf_name in PAIRS.items():
        t = tensors[gguf_name]
        want = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = state[hf_name].float().numpy()
        assert got.size == want.size, (gguf_name, got.shape, want.shape)
        np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=gguf_name)
        quantised += t.tensor_type.name.startswith("Q")
    assert quantised >= 4  # the comparison covers real dequantisation, not only float tensors


def test_zero_shot_text_to_product_beats_chance(converted, tmp_path, monkeypatch):
    """Untrained moon-smol (pretrained LM + pretrained image encoder, fresh projector) ranks the
    bought product of a text query far above chance: the LM's pretraining carries over."""
    monkeypatch.setenv("MOON_CACHE", str(converted.parent.parent))
    from moon.bench.runner import evaluate
    from moon.models import load_embedder
    from moon.world import synthesize

    store = synthesize(tmp_path / "world", n_products=60, seed=3, profile="small", show_progress=False)
    torch.manual_seed(0)
    model = load_embedder("moon-smol")
    result = evaluate(model, store, tasks=["text2product"], split="train", max_queries=60, batch_size=16)
    (task,) = result.tasks
    chance = float(np.mean([random_mrr_at_10(task.n_candidates, len(rel)) for rel in task.relevant]))
    assert task.n_queries >= 20
    assert task.metrics["mrr@10"] > 3 * chance, (task.metrics, chance, task.n_candidates)


def random_mrr_at_10(n: int, m: int) -> float:
    """Expected MRR@10 of a uniformly random ranking of ``n`` candidates, ``m`` of them relevant."""
    total, none_before = 0.0, 1.0
    for r in range(1, min(10, n - m + 1) + 1):  # the first relevant item is at rank n - m + 1 at worst
        first_here = none_before * m / (n - r + 1)
        total += first_here / r
        none_before *= (n - r + 1 - m) / (n - r + 1)
    return total


def test_random_mrr_formula():
    assert random_mrr_at_10(10, 1) == pytest.approx(sum(1 / r for r in range(1, 11)) / 10)
    assert random_mrr_at_10(5, 5) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    sims = [1.0 / (1 + int(np.flatnonzero(rng.permutation(30) < 3)[0])) for _ in range(20000)]
    sims = [s if s >= 0.1 else 0.0 for s in sims]
    assert random_mrr_at_10(30, 3) == pytest.approx(np.mean(sims), abs=0.01)
