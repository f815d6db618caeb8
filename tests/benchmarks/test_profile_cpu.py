"""CPU checks of benchmarks/profile_encode_train.py: behaviour, not timing.

* the ``--quick`` run (moon-graft-tiny) writes its JSON and Markdown with every row of every part,
  no negative time, and rows that add up to each part's total;
* the LM FLOPs it counts from the architecture equal what ``torch.utils.flop_counter.FlopCounterMode``
  counts on the same batches: the linear layers (``aten.mm`` + ``aten.addmm`` inside the decoder
  layers: q/k/v/o projections, dense MLPs, MoE router, shared and routed experts) and, with the math
  SDPA backend (which runs attention as two ``aten.bmm``), the attention scores and weighted sum;
  padded (what the batch computes) and unpadded (each record alone), dense and MoE layers, top-1 and top-2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_encode_train.py"


def _load():
    spec = importlib.util.spec_from_file_location("profile_encode_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_encode_train"] = module  # its dataclasses look the module up
    spec.loader.exec_module(module)
    return module


P = _load()


def _expected_rows(n_layers: int) -> dict[str, set[str]]:
    blocks = {f"L{i}.{part}" for i in range(n_layers) for part in ("self_attn", "mlp")}
    common = {"decode", "preprocess", "image_encoder", "input_building", "collate", "projector"}
    common |= {"lm_rest", "graft_glue", "other"} | blocks
    train = common | {"head", "loss", "bwd:lm_rest", "bwd:embed_tokens", "backward_rest", "grad_clip", "optimizer"}
    return {"encode_cold": common, "encode_warm": common, "train_step": train | {f"bwd:{b}" for b in blocks}}


@pytest.mark.slow
def test_quick_run_writes_every_row_and_rows_sum_to_each_total(tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--quick", "--preset", "moon-graft-tiny", "--out", str(tmp_path / "out"), "--results-dir", str(results)]
    report = P.main([*argv, "--tag", "smoke"])
    md_path, json_path = results / "profile-smoke.md", results / "profile-smoke.json"
    assert md_path.is_file() and json_path.is_file()
    saved = json.loads(json_path.read_text())
    assert saved["parts"].keys() == report["parts"].keys() == {"encode_cold", "encode_warm", "train_step"}
    assert saved["config"]["preset"] == "moon-graft-tiny" and saved["config"]["products"] == 8
    shape = P.LMShape(**{**saved["model"]["lm_shape"], "layer_kinds": tuple(saved["model"]["lm_shape"]["layer_kinds"])})
    expected = _expected_rows(len(shape.layer_kinds))

    for name, part in saved["parts"].items():
        keys = [r["key"] for r in part["rows"]]
        assert sorted(keys) == sorted(expected[name]), name  # every row, once
        total = part["total_seconds"]
        assert total > 0 and part["run_totals"] == [total]  # --quick: one run, the median one
        negative_other = any("other (Python overhead) is negative" in n for n in part["details"]["notes"])
        for row in part["rows"]:
            assert row["seconds"] >= 0 or (row["key"] == "other" and negative_other), (name, row)
            assert row["label"] and row["how"]
        assert math.isclose(sum(r["seconds"] for r in part["rows"]), total, rel_tol=1e-9, abs_tol=1e-12), name
        assert math.isclose(sum(r["percent"] for r in part["rows"]), 100.0, abs_tol=1e-6), name
        # the token counts behind the FLOPs are the tokens the MoE layers routed (recorded independently)
        flops = part["flops"]
        for layer, counts in part["details"]["routed_top1_tokens_per_expert"].items():
            assert sum(counts) == flops["real_tokens"] > 0, (name, layer)
        assert flops["useful"]["total"] == sum(P.lm_flops(shape, f["lengths"])["total"] for f in part["forwards"])
        assert flops["padded_tokens"] >= flops["real_tokens"]
        assert part["lm_forward"]["useful_gflops_per_s"] > 0

    cold, warm, train = (saved["parts"][k] for k in ("encode_cold", "encode_warm", "train_step"))
    rows = {k: {r["key"]: r["seconds"] for r in p["rows"]} for k, p in saved["parts"].items()}
    n_images = saved["separately_measured"]["images"]
    assert n_images > 0 and cold["details"]["images_encoded"] == n_images  # cold: every image through the encoder
    assert warm["details"]["images_encoded"] == 0 and train["details"]["images_encoded"] == 0  # warm cache
    assert all(rows["encode_cold"][k] > 0 for k in ("decode", "preprocess", "image_encoder"))
    # input building is a residual (the build gaps less the separately timed decode and preprocess):
    # on a loaded machine it can come out below 0, and is then shown as 0 with a note saying so
    building = rows["encode_cold"]["input_building"]
    assert building > 0 or (building == 0 and any("input_building" in n for n in cold["details"]["notes"]))
    assert all(rows["encode_warm"][k] == 0 for k in ("decode", "preprocess", "image_encoder"))
    assert cold["details"]["window_attribution"] and warm["details"]["window_attribution"]
    assert saved["config"]["images_with_crops"] > 0
    # the backward of every block was bracketed by its gradient hooks, once per side (queries, products)
    assert set(train["details"]["backward_spans"].values()) == {2}
    assert not train["details"]["backward_spans_overlap"]
    assert len(train["forwards"]) == 2 and train["lm_backward"]["lm_block_seconds"] > 0

    from moon.precision import resolve_bf16

    bf16 = resolve_bf16("auto", "cpu")
    assert saved["precision"] == {**saved["precision"], "requested": "auto", "bf16": bf16}
    assert set(saved["matmul_peak"]) == ({"fp32", "bf16"} if bf16 else {"fp32"})
    for per in saved["matmul_peak"].values():
        assert per["1024"]["gflops_median"] > 0 and per["2048"]["gflops_median"] > 0
    machine = saved["machine"]
    assert machine["torch_threads"] == torch.get_num_threads() and machine["cpu_model"]
    assert {"avx2", "avx512f", "avx512_bf16", "amx"} <= machine.keys() and set(saved["load_1min"]) == {"start", "end"}

    md = md_path.read_text()
    assert md.strip() in capsys.readouterr().out  # printed at the end
    for title in ("cold image-feature cache", "warm image-feature cache", "One training step"):
        assert title in md
    assert md.count("| **total** |") == 3 and "GFLOP/s" in md and "matmul peak" in md and "load average" in md


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Products of different lengths with 0-2 images (JPEG files), so that a batch of them is padded."""
    from PIL import Image

    from moon.data import Product

    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(((200, 30, 30), (20, 160, 40), (30, 40, 210))):
        path = root / f"img{i}.jpg"
        Image.new("RGB", (40 + 8 * i, 48), colour).save(path)
        paths.append(str(path))
    return [
        Product(id="a", title="red shoe", category=["Shoes"], images=paths[:1]),
        Product(id="b", title="green wool jumper, long sleeves " * 3, category=["Apparel", "Tops"], images=paths[1:]),
        Product(id="c", title="blue mug", attributes={"color": ["blue"]}),
    ]


def _torch_counts(emb, batch, n_layers: int) -> tuple[int, int]:
    """(linear, attention) FLOPs FlopCounterMode counts inside the decoder layers of one forward."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        emb(batch)
    counts = counter.get_flop_counts()
    linear = scores = 0
    for i in range(n_layers):
        ops = {str(op): n for op, n in counts[f"MoonEmbedder.backbone.lm.layers.{i}"].items()}
        linear += ops.get("aten.mm", 0) + ops.get("aten.addmm", 0)
        scores += ops.get("aten.bmm", 0)
    return linear, scores


@pytest.mark.parametrize(("moe_layers", "top_k"), [([1], 1), (None, 2)])
def test_counted_lm_flops_equal_torch_flop_counter(records, moe_layers, top_k):
    from moon.model import MoonEmbedder

    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", moe_layers=moe_layers, moe_top_k=top_k)
    shape = P.LMShape.of(emb)
    n_layers = len(shape.layer_kinds)
    assert shape.layer_kinds == (("dense", "moe") if moe_layers == [1] else ("moe", "moe")) and shape.top_k == top_k
    items = emb.build_product_inputs(records)
    batch = emb.collate(items)
    lengths = [int(x) for x in batch["attention_mask"].sum(1)]
    padded = int(batch["input_ids"].shape[1])
    assert min(lengths) < padded  # a padded batch
    useful = P.lm_flops(shape, lengths)
    assert emb.packing  # the default: the LM computes the real tokens only, exactly the useful count
    assert _torch_counts(emb, batch, n_layers) == (useful["linear"], useful["attn_scores"])
    emb.config = emb.config.replace(packed=False)
    counted = P.lm_flops(shape, lengths, padded_to=padded)  # what the padded batch computes
    assert _torch_counts(emb, batch, n_layers) == (counted["linear"], counted["attn_scores"])
    for item in items:  # each record alone: no padding, the useful count
        counted = P.lm_flops(shape, [len(item)])
        assert _torch_counts(emb, emb.collate([item]), n_layers) == (counted["linear"], counted["attn_scores"])
    useful, computed = P.lm_flops(shape, lengths), P.lm_flops(shape, lengths, padded_to=padded)
    summary = P.flops_of_forwards(shape, [{"lengths": lengths, "padded_len": padded}])
    assert summary["useful"]["total"] == useful["total"] < computed["total"] == summary["computed_padded"]["total"]
    assert summary["padding_fraction_tokens"] == pytest.approx(1 - sum(lengths) / (padded * len(lengths)))


def test_batch_mix_and_encode_windows():
    assert P._quotas(17, P.MODALITY_MIX) == {"image": 12, "text": 3, "multimodal": 2}  # the trainer's 12:3:2
    assert sum(P._quotas(4, P.MODALITY_MIX).values()) == 4
    plan = P.encode_batches(40, 2)  # windows of 2 × 16 records: 16 batches, then 4
    assert len(plan) == 20 and [i for i, (first, _) in enumerate(plan) if first] == [0, 16]
    assert [i for _, idx in plan for i in idx] == list(range(40))
