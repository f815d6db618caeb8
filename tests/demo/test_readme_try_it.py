"""The README's "Try it on the demo's results" block, run as written on a tiny demo output.

The block is found by its marker comment. Each line runs in ``bash`` from the directory that holds
the tiny demo's ``demo-out/`` (so the README's relative ``OUT=demo-out`` is used as it is), with the
venv's ``bin/`` first on ``PATH`` (what ``source .venv/bin/activate`` does) and the block's variable
lines before it. The only change made to the commands: the server's port 8000 becomes a free one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moon.data import ProductStore
from moon.demo import DemoConfig
from moon.demo.pipeline import _slug, default_models
from moon.index import read_manifest

REPO = Path(__file__).parents[2]
README = REPO / "README.md"
MARKER = "<!-- try-it: tests/demo/test_readme_try_it.py"
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S+)$")
README_PORT = "8000"

pytestmark = pytest.mark.slow


def try_it_block() -> list[str]:
    """The lines of the fenced bash block right after the marker (blank and comment lines dropped)."""
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, "README.md must hold exactly one try-it marker"
    after = text.split(MARKER, 1)[1].split("\n", 1)[1]
    assert after.startswith("```bash\n"), "the try-it marker must sit right above a ```bash block"
    block = after[len("```bash\n") :].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _split(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    variables = {m.group(1): m.group(2) for line in lines if (m := ASSIGNMENT.match(line))}
    commands = [line for line in lines if not ASSIGNMENT.match(line)]
    return variables, commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expand(variables: dict[str, str], word: str) -> str:
    """``$OUT/try/eval`` → ``demo-out/try/eval`` with the block's own variables (as bash would)."""
    for _ in range(len(variables) + 1):
        word = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: variables[m.group(1)], word)
    return word


def _args(variables: dict[str, str], command: str) -> list[str]:
    return [_expand(variables, w) for w in shlex.split(command, comments=True)]


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_block_names_the_demo_paths_the_code_writes():
    variables, commands = _split(try_it_block())
    # OUT is make demo's default output directory, which git ignores, as it does demo-quick/
    make_default = re.search(r"^DEMO_OUT \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert variables["OUT"] == make_default == "demo-out"
    ignored = (REPO / ".gitignore").read_text().split()
    assert "demo-out/" in ignored and "demo-quick/" in ignored
    for command in commands:  # everything the block writes lands under $OUT (ignored with it)
        args = shlex.split(command, comments=True)
        if "--out" in args:
            assert _option(args, "--out").startswith("$OUT/"), command
    moon_name = default_models()[0].name
    assert variables["MODEL"] == f"$OUT/stages/train-{_slug(moon_name)}/run/best"
    assert variables["STORE"] == "$OUT/stages/world/store"
    text = README.read_text(encoding="utf-8")
    for run in default_models():  # the README's list of stage names is the code's
        assert f"`{_slug(run.name)}`" in text, run.name
    eval_args = next(shlex.split(c, comments=True) for c in commands if c.startswith("moon eval "))
    assert int(_option(eval_args, "--max-queries")) == DemoConfig().eval_max_queries
    assert f"({DemoConfig.quick().eval_max_queries} with `--quick`)" in text
    assert f"`--max-queries {DemoConfig.quick().eval_max_queries}`" in text


def _env(cache: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    assert shutil.which("moon", path=str(bin_dir)), f"no `moon` next to {sys.executable} (run make setup)"
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MOON_CACHE": str(cache),  # the embedding cache of `moon eval`: not the user's
        "MOON_PROGRESS": "lines",
        "OMP_NUM_THREADS": "1",
    }


def _bash(prelude: str, command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{prelude}\n{command}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def _wait_until_serving(server: subprocess.Popen, port: int) -> None:
    """Until ``GET /healthz`` answers; fails with the server's output if it exits first."""
    deadline = time.monotonic() + 300  # a safety net against a hang, not a speed requirement
    while True:
        if server.poll() is not None:
            out, err = server.communicate()
            pytest.fail(f"moon serve exited with {server.returncode}\n{out}\n{err}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("moon serve did not answer /healthz")
        time.sleep(0.2)


def _search_table(stdout: str) -> list[tuple[int, float, str]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].split() == ["rank", "score", "id", "title"], stdout
    rows = []
    for line in lines[1:]:
        rank, score, pid = line.split()[:3]
        rows.append((int(rank), float(score), pid))
    return rows


def test_the_readme_try_it_commands_run_on_a_demo_output(tiny_demo, tmp_path):
    variables, commands = _split(try_it_block())
    workdir = tiny_demo.parent  # OUT=demo-out is relative: run where `make demo` would have written it
    assert variables["OUT"] == tiny_demo.name
    prelude = "\n".join(f"{k}={v}" for k, v in variables.items())
    env = _env(tmp_path / "cache")
    store = ProductStore(workdir / _expand(variables, "$STORE"))
    ids = set(store.product_ids())
    model_dir = (workdir / _expand(variables, "$MODEL")).resolve()
    port = _free_port()
    seen: dict[str, subprocess.CompletedProcess] = {}
    server: subprocess.Popen | None = None
    try:
        for command in commands:
            args = _args(variables, command)
            if args[:2] == ["moon", "serve"]:
                assert args[args.index("--port") + 1] == README_PORT
                line = command.replace(f"--port {README_PORT}", f"--port {port}")
                server = subprocess.Popen(
                    ["bash", "-c", f"{prelude}\nexec {line}"],
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                _wait_until_serving(server, port)
                continue
            if args[0] == "curl":
                assert server is not None, "the curl line needs the server started above it"
                assert f"localhost:{README_PORT}/" in command
                command = command.replace(f"localhost:{README_PORT}/", f"localhost:{port}/")
            key = " ".join(args[:3] if args[:2] == ["moon", "index"] else args[:2])
            seen[key] = _bash(prelude, command, workdir, env)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.communicate()
    assert set(seen) == {"moon eval", "moon index build", "moon index info", "moon search", "curl -s"}

    # moon eval: the report's MOON row, scored again
    eval_args = _args(variables, next(c for c in commands if c.startswith("moon eval ")))
    eval_dir = workdir / _option(eval_args, "--out")
    results = json.loads((eval_dir / "results.json").read_text())
    demo_results = json.loads(
        (tiny_demo / "stages" / f"eval-{_slug(default_models()[0].name)}" / "results.json").read_text()
    )
    assert set(results["tasks"]) == set(demo_results["tasks"])
    assert {"text2product", "image2product", "multimodal2product", "product2product"} <= set(results["tasks"])
    assert any(t.startswith("classification-") for t in results["tasks"])
    assert any(t.startswith("attribute-") for t in results["tasks"])
    for task, scored in results["tasks"].items():
        assert scored["n_queries"] == demo_results["tasks"][task]["n_queries"], task
        assert scored["metrics"] == pytest.approx(demo_results["tasks"][task]["metrics"], abs=1e-9), task
    assert sum(t["n_queries"] for t in results["tasks"].values()) > 0
    for name in ("results.md", "rankings.jsonl"):
        assert (eval_dir / name).stat().st_size > 0
    assert "| product2product |" in seen["moon eval"].stdout

    # moon index build / info: every product, the model recorded absolute
    index_dir = workdir / _expand(variables, "$OUT/try/index")
    manifest = read_manifest(index_dir)
    assert manifest.count == len(ids) and Path(manifest.model) == model_dir
    assert f"{len(ids):,} products" in seen["moon index build"].stdout
    info = dict(line.split(None, 1) for line in seen["moon index info"].stdout.splitlines() if line.strip())
    assert info["products"] == f"{len(ids):,}" and Path(info["model"]) == model_dir

    # moon search: k ranked hits, ids of the store
    search_args = _args(variables, next(c for c in commands if c.startswith("moon search ")))
    k = int(_option(search_args, "-k"))
    rows = _search_table(seen["moon search"].stdout)
    assert [r[0] for r in rows] == list(range(1, k + 1))
    assert {r[2] for r in rows} <= ids and len({r[2] for r in rows}) == k
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)

    # curl: the same query over HTTP gets the same products
    curl_args = _args(variables, next(c for c in commands if c.startswith("curl ")))
    body = json.loads(_option(curl_args, "-d"))
    answer = json.loads(seen["curl -s"].stdout)
    assert len(answer["results"]) == body["k"] == k
    assert body["text"] == _option(search_args, "--text") == answer["query"]["text"]
    assert [h["id"] for h in answer["results"]] == [r[2] for r in rows]
    assert [h["score"] for h in answer["results"]] == pytest.approx([r[1] for r in rows], abs=1e-4)
    assert all(h["product_url"] == f"/products/{h['id']}" for h in answer["results"])
