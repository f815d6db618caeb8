"""Done-criterion 3: kill -9 during training, then --resume: the losses equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moon.train.checkpoints import list_checkpoints
from moon.train.metrics_log import read_metrics

HERE = Path(__file__).parent
MOON = Path(sys.executable).parent / "moon"


def _cmd(store: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        str(MOON), "train", "--preset", "moon-tiny", "--model", "py:toy_embedder:make_toy",
        "--data", str(store), "--out", str(out), "--steps", str(steps), "--batch-size", "12",
        "negatives.hard=2", "negatives.queue_size=40", "negatives.queue_max_age=3", "loss.learn_temperature=true",
        "model.overrides={dropout: 0.3}", "optim.warmup_steps=3",
        "run.ckpt_every=5", "run.val_every=10", "run.tensorboard=false", "run.progress=false", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(small_store, tmp_path):
    steps = 120
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(small_store, ref, steps), check=True, env=_env(), capture_output=True)
    expected = {r["step"]: r for r in read_metrics(ref)}
    assert len(expected) == steps

    proc = subprocess.Popen(
        _cmd(small_store, run, steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list_checkpoints(run)) >= 1 and len(read_metrics(run)) >= 23:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = list_checkpoints(run)[-1][0]
    assert killed_at < steps

    subprocess.run(_cmd(small_store, run, steps, "--resume"), check=True, env=_env(), capture_output=True)
    got = {r["step"]: r for r in read_metrics(run)}
    assert sorted(got) == sorted(expected)
    for step in range(killed_at + 1, steps + 1):
        for key in ("loss", "negatives_per_query", "lr", "temperature"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-9, abs=1e-12), (step, key)
    assert got[steps]["val_recall@10"] == expected[steps]["val_recall@10"]


def test_without_resume_an_existing_run_is_refused(small_store, tmp_path, capsys):
    from moon.cli import main

    args = _cmd(small_store, tmp_path / "run", 3)[1:]
    main(args)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err
