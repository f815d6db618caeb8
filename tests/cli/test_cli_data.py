"""The `moon` command: groups listed, one-line errors for bad data, exit codes."""

import json
import subprocess
import sys

from moon.data import Product, write_store

MOON = [sys.executable, "-c", "from moon.cli import main; main()"]


def run(*args):
    return subprocess.run([*MOON, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_command_groups():
    out = run("--help")
    assert out.returncode == 0
    assert "data" in out.stdout


def test_stats_json_and_text(tmp_path):
    write_store(tmp_path / "s", [Product(id="a", title="t", category=["x", "y"], attributes={"c": ["r"]})])
    out = run("data", "stats", str(tmp_path / "s"), "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["category_levels"] == 2
    text = run("data", "stats", str(tmp_path / "s"))
    assert "products" in text.stdout and "1 types" in text.stdout


def test_validate_exit_codes(tmp_path):
    write_store(tmp_path / "s", [Product(id="a", title="t", images=["images/gone.png"])])
    bad = run("data", "validate", str(tmp_path / "s"))
    assert bad.returncode == 1
    assert "missing-file" in bad.stderr and "Traceback" not in bad.stderr
    write_store(tmp_path / "ok", [Product(id="a", title="t")])
    assert run("data", "validate", str(tmp_path / "ok")).returncode == 0


def test_not_a_store_is_one_line_error(tmp_path):
    out = run("data", "stats", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "not a product store" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_import_mbe_bad_file_is_one_line_error(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text("{not json")
    out = run("data", "import-mbe", str(src), "--out", str(tmp_path / "s"))
    assert out.returncode == 2 and "invalid JSON" in out.stderr and "Traceback" not in out.stderr
    out = run("data", "import-mbe", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "s"))
    assert out.returncode == 2 and "no such file" in out.stderr
    out = run("data", "import-mbe", str(src), "--out", str(tmp_path / "s"), "--query-columns", "junk")
    assert out.returncode == 2 and "--query-columns" in out.stderr
