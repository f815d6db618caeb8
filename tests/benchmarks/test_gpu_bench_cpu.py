"""CPU checks of benchmarks/gpu/bench_gpu.py on moon-tiny shapes: every code path the GPU run takes,
and the equalities that make its "ours" numbers (the library's fast path: packed sequences, grouped
MoE dispatch) comparable with the plain path (padded batches, one matmul per expert)."""

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


def test_library_fast_path_equals_the_plain_path(emb, items):
    plain_config = emb.config
    with torch.no_grad():
        with B.library_path(emb, ours=False):
            assert not emb.packing and emb.config.moe_dispatch == "loop"
            padded = emb(emb.collate(items))
            aux_padded = emb.aux_loss()
        with B.library_path(emb, ours=True):
            assert emb.packing and emb.config.moe_dispatch == "auto"  # the moon-tiny decoder packs
            packed = emb(emb.collate(items))
            aux_packed = emb.aux_loss()
    assert emb.config is plain_config  # the switch is undone
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(aux_packed, aux_padded, atol=1e-6, rtol=1e-5)


def test_grouped_mm_moe_equals_the_expert_loop(emb, items, monkeypatch):
    # on CPU even where ``auto`` does not pick it (torch 2.13's CPU grouped_mm runs forward; only a
    # stride-0 backward fails, which grouped_mm_works detects): this is a no-grad forward
    import torch.nn.functional as F

    from moon.model import moe

    if not hasattr(F, "grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    monkeypatch.setattr(moe, "grouped_mm_works", lambda device, dtype: True)
    calls, grouped_mm = [], F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    saved = emb.config
    out = {}
    try:
        with torch.no_grad():
            for dispatch in ("loop", "grouped_mm"):
                emb.config = saved.replace(packed=True, moe_dispatch=dispatch)
                out[dispatch] = (emb(emb.collate(items)), emb.aux_loss())
    finally:
        emb.config = saved
    assert len(calls) == 2 * len(emb.moe_layer_ids)  # really run: 2 grouped GEMMs per MoE layer
    torch.testing.assert_close(out["grouped_mm"][0], out["loop"][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out["grouped_mm"][1], out["loop"][1], atol=1e-6, rtol=1e-5)


def test_chunked_packed_training_gives_the_unchunked_gradients(emb, items):
    loss = B.ContrastiveLoss(0.05)
    queries, products = items[5:9], items[:4]
    grads = []
    for chunk, checkpointing in ((None, False), (2, False), (None, True)):
        emb.zero_grad(set_to_none=True)
        B.set_trainable(emb, "frozen-experts")
        B.set_checkpointing(emb, checkpointing)
        emb.train()
        try:
            with B.library_path(emb, ours=True):
                model = B.PreCollated(emb)
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
        peak_tflops=None, deadline=float("inf"),
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
    assert saved["packed"] is True and saved["attention_backend"] == "grouped_sdpa"  # always on CPU
    assert saved["moe_dispatch"] == ("grouped_mm" if B.grouped_mm_works(CPU, torch.float32) else "loop")


def test_window_sizes_match_the_towers_own(emb, items):
    """The attention windows :func:`count_flops` counts are the ones the vision tower makes."""
    from transformers.vision_utils import get_vision_window_index

    vcfg = B.base_model(emb.backbone).visual.config
    grid_thw = torch.cat([x.image_grid_thw for x in items if x.image_grid_thw is not None])
    _, cu = get_vision_window_index(grid_thw, 2, vcfg.window_size, vcfg.patch_size)
    theirs = [int(x) for x in torch.as_tensor(cu).diff().tolist() if int(x) > 0]
    win = vcfg.window_size // vcfg.patch_size
    ours = [s for _, h, w in grid_thw.tolist() for s in B._vision_windows(h, w, win, 2)]
    assert ours == theirs and len(ours) > len(grid_thw)  # several windows per image somewhere
