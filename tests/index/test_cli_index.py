import json

import pytest
from click.testing import CliRunner

from moon.cli import cli


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_build_search_remove_add_info(tmp_path, toy_store, toy_family):
    idx = str(tmp_path / "idx")
    out = run("index", "build", "--model", "toy", "--data", str(toy_store.root), "--out", idx)
    assert "12 products, exact index" in out

    # "toy" is a family registered by this test's own code: an index manifest naming it is not
    # trusted on its own word, the user names it with --model
    hits = json.loads(run("search", idx, "--model", "toy", "--text", "yellow hat", "-k", "2", "--json"))
    assert hits[0] == {"rank": 1, "id": "yellow-hat", "score": pytest.approx(hits[0]["score"]), "title": "yellow hat"}
    table = run(
        "search",
        idx,
        "--model",
        "toy",
        "--text",
        "yellow hat",
        "--image",
        str(toy_store.root / "images" / "yellow-hat.png"),
    )
    assert table.splitlines()[0].split() == ["rank", "score", "id", "title"]
    assert table.splitlines()[1].split()[2:] == ["yellow-hat", "yellow", "hat"]

    assert "removed 2 of 2 ids; 10 products indexed" in run("index", "remove", idx, "yellow-hat", "red-bag")
    assert all(
        h["id"] != "yellow-hat"
        for h in json.loads(run("search", idx, "--model", "toy", "--text", "yellow hat", "-k", "10", "--json"))
    )
    assert "added 2, re-encoded 0; 12 products indexed" in run("index", "add", idx, "--model", "toy")
    assert "added 0, re-encoded 1" in run("index", "add", idx, "--model", "toy", "--id", "red-bag")

    info = json.loads(run("index", "info", idx, "--json"))
    assert info["count"] == 12 and info["model"] == "toy" and info["kind"] == "exact"
    assert "recall@10" in run("index", "info", idx)


def test_cli_errors_are_one_line(tmp_path, toy_store, toy_family, capsys):
    from moon.cli import main

    idx = str(tmp_path / "idx")
    run("index", "build", "--model", "toy", "--data", str(toy_store.root), "--out", idx)
    for argv, message in [
        (["search", idx], "give a query text"),
        (["search", idx, "--text", "hat"], "which MOON does not load on a data file's word"),
        (["search", idx, "--model", "toy", "--text", "hat", "-k", "500"], "between 1 and 100"),
        (["search", idx, "--text", "hat", "--model", "toy:other"], "fingerprint"),
        (["index", "add", idx, "--model", "toy", "--id", "missing"], "not in the store"),
        (["index", "info", str(tmp_path)], "not a MOON index"),
        (["index", "build", "--model", "toy", "--data", str(toy_store.root), "--out", idx], "already exists"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
