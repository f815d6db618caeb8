import json

from click.testing import CliRunner

from moon.cli import cli, main


def test_detect_eval_run_gallery_with_saliency(tiny_store, tmp_path):
    runner = CliRunner()
    data = str(tiny_store.root)
    res = runner.invoke(cli, ["detect", "eval", "--data", data, "--detector", "saliency", "--split", "all", "--json"])
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    assert set(scores["kinds"]) == {"clean", "scene", "query", "all"}
    assert scores["kinds"]["all"]["n"] == 27
    res = runner.invoke(cli, ["detect", "run", "--data", data, "--detector", "saliency", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "1 skipped" in res.output and "images/broken.jpg" in res.output
    res = runner.invoke(
        cli, ["detect", "gallery", "--data", data, "--detector", "saliency", "--out", str(tmp_path / "g.png")]
    )
    assert res.exit_code == 0 and (tmp_path / "g.png").is_file()


def test_learned_without_model_is_a_one_line_error(tiny_store, capsys):
    try:
        main(["detect", "eval", "--data", str(tiny_store.root), "--detector", "learned"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the learned detector needs --model")
