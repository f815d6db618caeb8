import json
import re

import pytest
from click.testing import CliRunner

from moon.bench.metrics import classification_metrics, retrieval_metrics
from moon.cli import cli
from moon.data import ProductStore


@pytest.fixture(scope="module")
def random_run(store_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "random"
    res = CliRunner().invoke(
        cli, ["eval", "--model", "random", "--data", str(store_dir), "--out", str(out), "--no-cache"]
    )
    assert res.exit_code == 0, res.output
    return out


def test_eval_writes_every_output(random_run):
    names = {p.name for p in random_run.iterdir()}
    assert {
        "results.json",
        "rankings.jsonl",
        "results.md",
        "recall_curves.png",
        "level_accuracy.png",
        "attribute_confusion.png",
    } <= names
    results = json.loads((random_run / "results.json").read_text())
    assert results["model"] == "random(seed=0)"
    for name, task in results["tasks"].items():
        assert set(task) >= {"metrics", "main_score", "n_queries"}
        for value in task["metrics"].values():
            assert 0.0 <= value <= 1.0, name


def test_results_agree_with_rankings_and_purchases(random_run, store_dir):
    """Recompute every metric from rankings.jsonl + the store's purchases / groups / labels."""
    store = ProductStore(store_dir)
    results = json.loads((random_run / "results.json").read_text())
    rows: dict[str, list[dict]] = {}
    for line in (random_run / "rankings.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["task"], []).append(row)
    assert set(rows) == set(results["tasks"])
    positives = store.positives("test")
    products = {p.id: p for p in store.products()}
    groups: dict[str, set[str]] = {}
    for p in products.values():
        if p.group:
            groups.setdefault(p.group, set()).add(p.id)
    for task, task_rows in rows.items():
        reported = results["tasks"][task]
        assert reported["n_queries"] == len(task_rows)
        if task == "product2product":
            relevant = [groups[products[r["query_id"]].group] - {r["query_id"]} for r in task_rows]
            recomputed = retrieval_metrics([r["ranked_product_ids"] for r in task_rows], relevant)
        elif "ranked_product_ids" in task_rows[0]:
            assert len(task_rows[0]["ranked_product_ids"]) == len(products)  # top 100 of a 16-product catalogue
            relevant = [positives[r["query_id"]] for r in task_rows]
            recomputed = retrieval_metrics([r["ranked_product_ids"] for r in task_rows], relevant)
        else:
            pred = [r["ranked_labels"][0] for r in task_rows]
            truth = [p if p in r["labels"] else r["labels"][0] for p, r in zip(pred, task_rows, strict=True)]
            recomputed = classification_metrics(truth, pred)
        assert reported["metrics"] == pytest.approx(recomputed), task
    # the query without a purchase is not scored; the one with two purchases is
    assert all(r["query_id"] != "q-nobuy" for r in rows["text2product"])
    assert results["tasks"]["text2product"]["n_queries"] == 4


def test_compare_and_json(random_run, store_dir, tmp_path):
    runner = CliRunner()
    other = tmp_path / "random1"
    res = runner.invoke(
        cli,
        [
            "eval",
            "--model",
            "random:1",
            "--data",
            str(store_dir),
            "--tasks",
            "retrieval",
            "--out",
            str(other),
            "--no-plots",
            "--json",
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout[res.stdout.index("{") :])
    assert set(printed["tasks"]) == {"text2product", "image2product", "multimodal2product", "product2product"}
    assert list((tmp_path / "cache").glob("*.npy"))
    for suffix in (".md", ".json", ".png"):
        res = runner.invoke(
            cli, ["eval", "compare", str(random_run), str(other), "--out", str(tmp_path / f"cmp{suffix}")]
        )
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"cmp{suffix}").stat().st_size > 0
    table = json.loads((tmp_path / "cmp.json").read_text())
    assert set(table) == {"random(seed=0)", "random(seed=1)"}
    assert table["random(seed=1)"]["text2product"] == printed["tasks"]["text2product"]["main_score"]
    assert "attribute-color" in (tmp_path / "cmp.md").read_text()


def test_usage_errors(tmp_path):
    res = CliRunner().invoke(cli, ["eval", "--model", "random"])
    assert res.exit_code != 0 and "--data" in res.output
    res = CliRunner().invoke(cli, ["eval", "compare", str(tmp_path), "--out", str(tmp_path / "x.md")])
    assert res.exit_code != 0 and "results.json" in str(res.exception)


def test_eval_progress_in_a_log_is_plain_lines(store_dir, monkeypatch):
    monkeypatch.delenv("MOON_PROGRESS", raising=False)  # auto: CliRunner's stderr is not a terminal
    res = CliRunner().invoke(cli, ["eval", "--model", "random", "--data", str(store_dir), "--no-cache"])
    assert res.exit_code == 0, res.output
    done = re.search(r"^eval tasks: (\d+)/(\d+) done in ", res.stderr, re.M)
    assert done and done.group(1) == done.group(2) and int(done.group(1)) > 5
    assert "\r" not in res.stderr and "\x1b" not in res.stderr
