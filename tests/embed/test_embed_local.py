"""`moon embed` with the local engine: shard format, exact vectors, manifest, CLI, index from vectors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from moon.cli import cli
from moon.data import ProductStore
from moon.embed import VectorFormatError, VectorShards, embed_store, read_manifest
from moon.embed.shards import file_sha256
from moon.errors import ConfigError


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _read_all(out) -> tuple[list[str], np.ndarray]:
    ids, parts = [], []
    for shard_ids, vectors in VectorShards.open(out):
        ids.extend(shard_ids)
        parts.append(vectors)
    return ids, np.concatenate(parts)


def test_shards_hold_exactly_what_encode_products_gives(tmp_path, store_factory, tiny_model):
    # batch 2 → encode windows of 32 products; shards of 32 keep the windows of one whole-store call
    root = store_factory(tmp_path / "store", n_products=70)
    products = ProductStore(root).products()
    out = tmp_path / "vectors"
    summary = embed_store(root, out, tiny_model, model="moon-tiny", shard_size=32, batch_size=2)
    assert (summary.products, summary.shards_written, summary.shards_skipped) == (70, 3, 0)
    ids, vectors = _read_all(out)
    assert ids == [p.id for p in products] and len(set(ids)) == len(ids)
    expected = tiny_model.encode_products(products, batch_size=2)
    assert vectors.dtype == np.float32 and np.array_equal(vectors, expected)

    m = read_manifest(out)
    assert (m.model, m.fingerprint, m.dim, m.shard_size, m.products) == (
        "moon-tiny", tiny_model.fingerprint(), tiny_model.dim, 32, 70
    )  # fmt: skip
    assert [(s.file, s.start, s.rows) for s in m.shards] == [
        ("shard-00000.parquet", 0, 32), ("shard-00001.parquet", 32, 32), ("shard-00002.parquet", 64, 6)
    ]  # fmt: skip
    assert all(file_sha256(out / s.file) == s.sha256 for s in m.shards)


def test_shard_schema_and_manifest_file(tmp_path, store, counting):
    out = tmp_path / "vectors"
    embed_store(store, out, counting(), model="count", shard_size=10)
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 16)
    assert table.num_rows == 10
    data = json.loads((out / "manifest.json").read_text())
    assert data["format"] == "moon-vectors" and data["model"] == "count" and data["dim"] == 16
    assert [s["rows"] for s in data["shards"]] == [10, 10, 5]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-0000{i}.parquet" for i in range(3)]


def test_mismatched_model_or_shard_size_is_refused(tmp_path, store, counting):
    out = tmp_path / "vectors"
    embed_store(store, out, counting(), model="count", shard_size=10)
    with pytest.raises(ConfigError, match="fingerprint") as info:
        embed_store(store, out, counting("other"), model="count:other", shard_size=10)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="shard size 10, this run has 8"):
        embed_store(store, out, counting(), model="count", shard_size=8)
    again = counting("other")
    summary = embed_store(store, out, again, model="count:other", shard_size=8, overwrite=True)
    assert summary.shards_written == 4 and len(again.encoded) == 25
    assert read_manifest(out).fingerprint == again.fingerprint()
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(4)]


def test_cli_embed_help_summary_and_one_line_errors(tmp_path, store, count_family, one_line_cli_error):
    from moon.embed import DEFAULT_SHARD_SIZE

    text = run("embed", "--help")
    assert "--engine [local|ray]" in text and f"default: {DEFAULT_SHARD_SIZE}" in text
    assert "--from-vectors" in run("index", "build", "--help")
    assert "embed" in run("--help")
    out = str(tmp_path / "vectors")
    text = run("embed", "--data", str(store), "--model", "count", "--out", out, "--shard-size", "10")
    assert "25 products in 3 shards" in text and "products/s" in text and "shards written 3" in text
    text = run("embed", "--data", str(store), "--model", "count", "--out", out, "--shard-size", "10")
    assert "embedded 0 products now" in text and "skipped (already finished) 3" in text
    line = one_line_cli_error(["embed", "--data", str(store), "--model", "count:x", "--out", out, "--shard-size", "10"])
    assert "fingerprint" in line and "--overwrite" in line
    line = one_line_cli_error(["embed", "--data", str(store), "--model", "count", "--out", str(store)])
    assert "products.parquet" in line


@pytest.mark.parametrize("kind", ["auto", "hnsw"])
def test_index_from_vectors_matches_a_normal_build(tmp_path, store, count_family, one_line_cli_error, kind):
    vectors, normal, shard_index = (str(tmp_path / d) for d in ("vectors", "normal", "from-vectors"))
    run("embed", "--data", str(store), "--model", "count", "--out", vectors, "--shard-size", "7")
    run("index", "build", "--model", "count", "--data", str(store), "--out", normal, "--kind", kind)
    text = run("index", "build", "--model", "count", "--from-vectors", vectors, "--out", shard_index, "--kind", kind)
    assert "25 products" in text
    a, b = (json.loads(run("index", "info", d, "--json")) for d in (normal, shard_index))
    for key in ("model", "fingerprint", "dim", "count", "kind", "params", "store", "recall_at_10", "recall_source"):
        assert a[key] == b[key], key
    for text_query in ("red shoe", "blue hat", "grey mug number 3"):
        hits = [
            json.loads(run("search", d, "--model", "count", "--text", text_query, "-k", "5", "--json"))
            for d in (normal, shard_index)
        ]
        assert hits[0] == hits[1]

    line = one_line_cli_error(
        ["index", "build", "--model", "count:other", "--from-vectors", vectors, "--out", str(tmp_path / "bad")]
    )
    assert "fingerprint" in line and "pass the model that wrote the vectors" in line
    assert not (tmp_path / "bad").exists()
    line = one_line_cli_error(["index", "build", "--model", "count", "--out", str(tmp_path / "bad")])
    assert "--from-vectors" in line


def test_index_from_unfinished_or_damaged_vectors_is_refused(tmp_path, store, counting, interrupted):
    from moon.index.from_vectors import build_index_from_shards

    out = tmp_path / "vectors"
    with pytest.raises(interrupted):
        embed_store(store, out, counting(fail_after=12), model="count", shard_size=10)
    with pytest.raises(VectorFormatError, match="1 of 3 shards are finished"):
        build_index_from_shards(out, tmp_path / "idx", counting())
    embed_store(store, out, counting(), model="count", shard_size=10)
    path = out / "shard-00001.parquet"
    path.write_bytes(path.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(VectorFormatError, match="damaged or replaced"):
        build_index_from_shards(out, tmp_path / "idx", counting())
