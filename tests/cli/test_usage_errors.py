"""A bad option or value on any command is one ``error: …`` line naming the option and the command's
--help, exit 2 — never click's four-line usage block or a traceback."""

import pytest

from moon.cli import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["index", "build", "--data", "x", "--model", "y", "--out", "z", "--batch-size", "abc"], "'--batch-size'"),
        (["train", "--steps", "many"], "'--steps'"),
        (["eval", "--max-queries", "abc"], "'--max-queries'"),
        (["embed", "--data", "x", "--model", "y", "--out", "z", "--shard-size", "0"], "'--shard-size'"),
        (["data", "synth", "--products", "1e3", "--out", "w"], "'--products'"),
        (["search", "--no-such-option"], "--no-such-option"),
        (["embed", "--engine", "spark", "--data", "x", "--model", "y", "--out", "z"], "'--engine'"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_a_usage_error_is_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert "--help')" in lines[0] and "Traceback" not in err
