"""CPU checks of benchmarks/gpu/bench_gpu.py on moon-tiny shapes: every code path the GPU run takes,
and the equalities that make its "ours" numbers comparable with the plain Hugging Face path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "bench_gpu.py"
CPU = torch.device("cpu")

torch.set_num_threads(1)


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


B = _load()


@pytest.fixture(scope="module")
def emb():
    """moon-tiny, MoE in all layers, experts perturbed so that a wrong dispatch changes the output."""
    model = B.build_model("moon-tiny", "all", CPU, torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe in B.moe_layers(model.backbone):
            for p in moe.experts.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            moe.router.weight.normal_(0, 1.0, generator=gen)  # routes away from the guided choice too
    B._register_text_attention()
    return model


@pytest.fixture(scope="module")
def items():
    shapes = B.Shapes.tiny()
    shapes.product_sides += ((224, 168),)  # several 112-px attention windows per image, a partial one too
    return B.synthetic_products(5, shapes, seed=3) + B.synthetic_queries(6, shapes, seed=4)


def test_synthetic_records_follow_the_input_builder_layout(items):
    for item in items:
        assert item.input_ids.shape == item.aspect_ids.shape
        assert int(item.input_ids[-1]) == B.END
        n_pad = int((item.input_ids == B.IMAGE_PAD).sum())
        if item.image_grid_thw is None:
            assert n_pad == 0 and item.pixel_values is None
            continue
        grid = item.image_grid_thw
        assert n_pad == int(grid.prod(-1).sum()) // 4
        assert item.pixel_values.shape == (int(grid.prod(-1).sum()), B.PATCH_DIM)
        assert int((item.input_ids == B.VISION_START).sum()) == len(grid) == len(item.image_aspects)
    mix = [("text" if q.image_grid_thw is None else "image") for q in B.synthetic_queries(17, B.Shapes.tiny())]
    assert mix.count("text") == 3  # 12 : 3 : 2, text-only are the 3


@pytest.mark.parametrize("backend", ["grouped_sdpa"])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_sdpa_equals_per_sequence_attention(backend, causal):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 3, 5, 9, 3]
    q = torch.randn(sum(lengths), 4, 8, generator=gen)
    k, v = torch.randn(sum(lengths), 2, 8, generator=gen), torch.randn(sum(lengths), 2, 8, generator=gen)
    cu = torch.tensor([0, 5, 8, 13, 22, 25])
    got = B.VarlenAttention(CPU, force=backend)(q, k, v, cu, 9, lengths, causal, 0.3)
    ref, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        qs, ks, vs = (x[s].transpose(0, 1) for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
        ref.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=0.3))
        start += n
    torch.testing.assert_close(got, torch.cat([r.transpose(0, 1) for r in ref]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_packed_path_equals_padded_hf_forward(emb, items, grouped):
    if grouped and not B.grouped_mm_works(CPU, torch.float32):
        pytest.skip("this torch has no CPU float32 grouped_mm")
    attn = B.VarlenAttention(CPU)
    with torch.no_grad():
        padded = emb(emb.collate(items))
        aux_padded = emb.aux_loss()
        with B.ours_mode(emb, attn, grouped):
            packed = B.packed_embed(emb, B.pack(items), attn)
            aux_packed = emb.aux_loss()
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(aux_packed, aux_padded, atol=1e-6, rtol=1e-5)
    # the patches are undone: the library forward is back
    assert all("forward" not in m.__dict__ for m in B.moe_layers(emb.backbone))


def test_chunked_packed_training_gives_the_unchunked_gradients(emb, items):
    attn = B.VarlenAttention(CPU)
    loss = B.ContrastiveLoss(0.05)
    queries, products = items[5:9], items[:4]
    grads = []
    for chunk, checkpointing in ((None, False), (2, False), (None, True)):
        emb.zero_grad(set_to_none=True)
        B.set_trainable(emb, "frozen-experts")
        B.set_checkpointing(emb, checkpointing)
        emb.train()
        try:
            with B.ours_mode(emb, attn, False):
                model = B._PackedModel(emb, attn)
                B.forward_backward(model, queries, products, B.in_batch_loss(loss), chunk_size=chunk, aux_weight=0.01)
        finally:
            B.set_checkpointing(emb, False)
            emb.eval()
        grads.append({n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None})
    emb.zero_grad(set_to_none=True)
    assert grads[0] and not any(".experts." in n for n in grads[0])  # frozen experts get no gradient
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], atol=1e-5, rtol=1e-3)


def test_flop_count_equals_torch_flop_counter_for_weight_products(emb, items):
    """Everything but the attention products: counted from the config == counted by torch."""
    bcfg = B.base_model(emb.backbone).config
    for item in (items[0], items[5], items[-1]):
        counted = B.count_flops(bcfg, [item], emb.moe_layer_ids, emb.config.moe_top_k)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            emb(emb.collate([item]))
        ops = counter.get_flop_counts()["Global"]
        weights = sum(v for k, v in ops.items() if str(k) in ("aten.mm", "aten.addmm", "aten.convolution"))
        assert counted["vision"] + counted["llm_dense"] + counted["llm_experts"] == weights


def test_attention_and_window_counts_known_answers(emb):
    assert B._vision_windows(32, 32, 8, 2) == [64] * 16  # 448 px: 16 windows of 8x8 patches
    sizes = B._vision_windows(28, 24, 8, 2)  # 392 x 336 px
    assert sum(sizes) == 28 * 24 and sizes.count(64) == 9 and len(sizes) == 12
    bcfg = B.base_model(emb.backbone).config
    zeros = torch.zeros(10, dtype=torch.long)
    text = B.EncodedInput(
        input_ids=zeros, aspect_ids=zeros, pixel_values=None, image_grid_thw=None, image_aspects=[], record_id="t"
    )
    c = B.count_flops(bcfg, [text], [], 1)
    t = bcfg.get_text_config()
    assert c["attention"] == t.num_hidden_layers * 2 * 10 * 10 * t.hidden_size  # causal: half of 4·L²·H
    assert c["llm_experts"] == 0 and c["vision"] == 0
    assert B.train_flops({"total": 10.0, "llm_experts": 2.0}, experts_trainable=False) == 28.0
    assert B.train_flops({"total": 10.0, "llm_experts": 2.0}, experts_trainable=True) == 30.0


def test_dense_mode_swaps_moe_for_the_shared_mlp_and_back(emb):
    layers = B.language_model(emb.backbone).layers
    before = [layer.mlp for layer in layers]
    with B.dense_mode(emb):
        assert all(layer.mlp is moe.shared for layer, moe in zip(layers, before, strict=True))
    assert [layer.mlp for layer in layers] == before


def test_oom_is_recorded_not_raised(emb, items):
    bench = B.Bench(
        emb=emb, device=CPU, products=items[:2], queries=items[5:7], args=B.parse_args(["--out", "x", "--quick"]),
        attn=B.VarlenAttention(CPU), grouped_mm=False, peak_tflops=None, deadline=float("inf"),
    )  # fmt: skip

    def boom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    bench.variant("train_hf", boom)
    assert bench.results["train_hf"]["status"] == "oom"
    bench.deadline = 0.0
    bench.variant("embed_ours", boom)
    assert bench.results["embed_ours"]["status"] == "skipped"


def test_cpu_smoke_run_writes_a_labelled_result_file(tmp_path, monkeypatch):
    plain = B.Bench.train_hf

    def train_hf_fitting_half_the_batch(self):  # the plain way running out of memory at the full batch
        if len(self.products) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return plain(self)

    monkeypatch.setattr(B.Bench, "train_hf", train_hf_fitting_half_the_batch)
    report = B.main(["--device", "cpu", "--preset", "moon-tiny", "--quick", "--profile", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0].startswith("cpu-smoke-") and "profile-train_ours.txt" in files and "profile-train_hf.txt" in files
    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["smoke_run"] is True and "NOT GPU" in saved["note"]
    assert saved["bf16_peak_tflops_measured"] is None
    floor = saved["floor"]
    assert floor["params"]["total"] == report["params_total"]  # the meta-device count equals the built model
    assert floor["params"]["trainable"] == report["params_trainable"]
    assert floor["train_step_tflop"] > 0 and floor["moe_over_dense_flop_ratio"] > 1
    results = saved["results"]
    assert results["train_hf"]["status"] == "oom"
    assert saved["ratios"]["train_hf_variant_compared"] == "train_hf_half_batch"
    for name in (
        "train_hf_half_batch",
        "train_ours[ckpt,chunk=None]",
        "train_ours[nockpt,chunk=2]",
        "train_ours_dense",
    ):
        assert results[name]["status"] == "ok", results[name]
        assert results[name]["mfu"] is None  # no peak on CPU: no MFU
    assert results["embed_naive"]["status"] == results["embed_ours"]["status"] == "ok"
    assert set(saved["ratios"]) >= {
        "train_ours_over_hf_throughput",
        "moe_step_over_dense_step",
        "embed_ours_over_naive_throughput",
    }
    assert report["moe_layers"] == [0, 1]


def test_window_sizes_and_max_seqlens_match_the_towers_own(emb, items):
    from transformers.vision_utils import get_vision_window_index

    vcfg = B.base_model(emb.backbone).visual.config
    batch = B.pack(items)
    grids = batch.image_grid_thw.tolist()
    _, cu = get_vision_window_index(batch.image_grid_thw, 2, vcfg.window_size, vcfg.patch_size)
    theirs = [int(x) for x in torch.as_tensor(cu).diff().tolist() if int(x) > 0]
    win = vcfg.window_size // vcfg.patch_size
    ours = [s for _, h, w in grids for s in B._vision_windows(h, w, win, 2)]
    assert ours == theirs and len(ours) > len(grids)  # several windows per image somewhere
    full, window = B.vision_max_seqlens(vcfg, batch.image_grid_thw)
    assert (full, window) == (max(h * w for _, h, w in grids), max(theirs))
