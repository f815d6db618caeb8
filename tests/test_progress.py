"""moon.progress: plain progress lines for logs, the mode switch, and warnings counted per kind."""

from __future__ import annotations

import io
import warnings

import pytest

from moon import progress
from moon.progress import LineProgress, bar, track, warnings_summary


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_writes_a_plain_line_per_ten_percent_and_a_done_line():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(100, "encode products", unit="products", file=out, clock=clock)
    for _ in range(100):
        clock.t += 1.0  # 1 s per item: every 10 % mark is ≥ 5 s after the last line
        p.update(1)
    p.set_postfix(loss="0.5")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, … 90 %, then "done"
    assert lines[0].startswith("encode products: 10/100 (10%) 10 s, ~1 min 30 s left")
    assert lines[-1] == "encode products: 100/100 done in 1 min 40 s (1.0 products/s)  loss=0.5"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_line_progress_rate_limits_fast_loops_and_beats_for_slow_ones():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(1000, "tasks", file=out, clock=clock)
    for _ in range(1000):  # 1 ms per item: 10 % marks come far less than 5 s apart
        clock.t += 0.001
        p.update(1)
    p.close()
    assert out.getvalue().splitlines() == ["tasks: 1,000/1,000 done in 1.0 s (1000.0 it/s)"]

    out, clock = io.StringIO(), Clock()
    p = LineProgress(None, "train", file=out, clock=clock, every_seconds=30)
    for _ in range(4):  # unknown total: a line whenever 30 s have passed
        clock.t += 20
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["train: 2 it 40 s", "train: 4 it 1 min 20 s", "train: 4 it done in 1 min 20 s (0.1 it/s)"]


def test_mode_follows_env_and_terminal(monkeypatch, capsys):
    monkeypatch.setenv("MOON_PROGRESS", "lines")
    assert progress.mode() == "lines"
    with bar(3, "outer") as outer:
        for _ in track(range(2), "inner"):
            pass
        outer.update(3)
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("inner: 2/2 done") and err.splitlines()[1].startswith("outer: 3/3 done")
    assert "\x1b[A" not in err and "\r" not in err
    monkeypatch.setenv("MOON_PROGRESS", "off")
    with bar(3, "quiet") as b:
        b.update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MOON_PROGRESS", "auto")
    assert progress.mode() == "lines"  # pytest's stderr is not a terminal
    monkeypatch.setenv("MOON_PROGRESS", "bar")
    with bar(3, "tty") as b:
        assert type(b._inner).__module__.startswith("tqdm")
    with bar(3, "disabled", enabled=False) as b:
        b.update(1)
    assert "disabled" not in capsys.readouterr().err


class Truncation(UserWarning):
    pass


def _warn_per_record(n: int) -> None:
    for i in range(n):
        warnings.warn(f"p{i}: text has {100 + i} tokens > max_text_tokens=64; shortened", Truncation, stacklevel=1)


def test_warnings_of_one_kind_are_counted_and_summarised_once():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with warnings_summary("encode products"):
            _warn_per_record(244)
            warnings.warn("p3: 9 images > max_images=3; keeping the first 3", Truncation, stacklevel=1)
            warnings.warn("something else", RuntimeWarning, stacklevel=1)
    texts = sorted(str(w.message) for w in shown)
    assert texts == [
        'encode products: 244 Truncations like "p0: text has 100 tokens > max_text_tokens=64; shortened"',
        "p3: 9 images > max_images=3; keeping the first 3",  # one of its kind: as it was
        "something else",
    ]
    assert {w.category for w in shown} == {Truncation, RuntimeWarning}


def test_summaries_nest_and_respect_outer_filters():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r".*images > max_images")
        before = warnings.showwarning
        outer = bar(2, "tasks", enabled=False)
        for _ in range(2):
            with bar(10, "encode products", enabled=False):
                _warn_per_record(10)
                warnings.warn("p1: 9 images > max_images=3", Truncation, stacklevel=1)  # ignored outside
        assert shown == []  # nothing until the outermost summary closes
        outer.close()
        assert warnings.showwarning is before
    assert [str(w.message) for w in shown] == [
        'encode products: 20 Truncations like "p0: text has 100 tokens > max_text_tokens=64; shortened"'
    ]


def test_error_filter_raises_inside_and_out_of_order_close_restores_showwarning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Truncation), warnings_summary("x"):
            _warn_per_record(1)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        before = warnings.showwarning
        a, b = bar(1, "a", enabled=False), bar(1, "b", enabled=False)
        _warn_per_record(2)  # caught by b, the innermost
        a.close()
        b.close()
        assert warnings.showwarning is before
    assert [str(w.message) for w in shown] == [
        'b: 2 Truncations like "p0: text has 100 tokens > max_text_tokens=64; shortened"'
    ]


def test_a_bar_dropped_unclosed_stops_collecting():
    before = warnings.showwarning
    b = bar(5, "interrupted", enabled=False)
    assert warnings.showwarning is not before
    del b
    assert warnings.showwarning is before


def test_the_library_shows_progress_only_through_moon_progress():
    # every long loop goes through moon.progress (plain lines in logs, bars in terminals, warnings
    # summarised): no module but moon/progress.py imports tqdm itself
    import ast
    from pathlib import Path

    import moon

    root = Path(moon.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "progress.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "tqdm" or n.startswith("tqdm.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_world_synthesis_writes_plain_progress_lines_to_a_log(tmp_path, capsys, monkeypatch):
    from moon.world import synthesize

    monkeypatch.delenv("MOON_PROGRESS", raising=False)  # auto: stderr is captured, not a terminal
    synthesize(tmp_path / "w", n_products=3, seed=0, show_progress=True, workers=1)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert "synth: 3/3 done in" in err
