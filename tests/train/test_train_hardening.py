"""Issue #16, training: nothing unpickles, a damaged newest checkpoint falls back to the previous one,
bad configs are one-line errors, py: specs only from the user, and the two validation scores."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import hardening_store_at, toy_run_config

from moon.errors import ConfigError, MoonError
from moon.train import checkpoints as ckpt
from moon.train import load_config, train
from moon.train.metrics_log import read_metrics


class _Planted:
    """Unpickling this writes a marker file: the proof of concept of a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def store(hardening_store):
    return hardening_store


@pytest.fixture
def finished(hardening_run):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 (shared: copy it before changing it)."""
    return hardening_run


# --- checkpoints: safetensors + JSON, never pickles -------------------------------------------


def test_checkpoint_files_hold_no_pickle_and_states_read_back_equal(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    trainer = {"optimizer": opt.state_dict(), "best": float("-inf"), "step": 7, "pair": (1, "a"), "none": None}
    tmp = ckpt.begin_checkpoint(tmp_path, 7)
    ckpt.write_rng(tmp, 0)
    expected_rng = ckpt.rng_state()
    path = ckpt.finish_checkpoint(tmp_path, 7, tmp, ckpt.model_state(net), trainer, keep_last=2)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "model.safetensors", "rng-rank0.json", "rng-rank0.safetensors", "trainer.json",
        "trainer.safetensors",
    ]  # fmt: skip
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} is a pickle"  # pickle protocol 2+ opcode
    model, got, rng = ckpt.read_checkpoint(path, 0)
    assert all(torch.equal(model[k], v) for k, v in net.state_dict().items())
    assert got["best"] == float("-inf") and got["pair"] == (1, "a") and got["none"] is None and got["step"] == 7
    state = got["optimizer"]
    assert list(state["state"]) == [0, 1]  # integer keys survive JSON
    assert state["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(state)
    assert rng["python"] == expected_rng["python"]
    assert all(np.array_equal(a, b) for a, b in zip(rng["numpy"], expected_rng["numpy"], strict=True))
    assert torch.equal(rng["torch"], expected_rng["torch"])


def test_a_planted_pickle_checkpoint_is_refused_and_never_unpickled(store, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    for name in ("model.pt", "trainer.pt", "rng-rank0.pt"):
        (step / name).write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ckpt.CheckpointError, match="old pickled format"):
        train(toy_run_config(store, run), resume=True)
    with pytest.raises(ckpt.CheckpointError, match="old pickled format"):
        train(toy_run_config(store, run))  # nor overwritten without --resume
    assert not marker.exists()

    from moon.cli import main

    args = ["train", "--preset", "moon-tiny", "--model", "py:toy_embedder:make_toy", "--data", str(store)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_pickles_planted_under_the_new_names_are_damage_not_code(store, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "pwned"
    newest = ckpt.latest_checkpoint(run)[1]
    for f in newest.iterdir():
        if f.name != "checkpoint.json":
            size = f.stat().st_size
            f.write_bytes(pickle.dumps(_Planted(marker)).ljust(size, b"."))  # same size: passes the size check
    with pytest.warns(RuntimeWarning, match="skipping a damaged checkpoint"):
        train(toy_run_config(store, run), resume=True)
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncate model", "zero trainer", "truncate rng", "garbage trainer.json"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(store, finished, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    expected = read_metrics(finished)
    newest = run / "checkpoints" / "step-00000006"
    how, what = damage.split()
    name = {"model": "model.safetensors", "trainer": "trainer.safetensors", "rng": "rng-rank0.safetensors"}.get(
        what, what
    )
    f = newest / name
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "zero":
        f.write_bytes(b"")
    else:
        f.write_bytes(b"{" + b"\xff" * (f.stat().st_size - 1))  # same size, not JSON
    with pytest.raises(ckpt.CheckpointError, match=str(f.name)):
        ckpt.read_checkpoint(newest, 0)
    with pytest.warns(RuntimeWarning, match=f"skipping a damaged checkpoint: {newest}"):
        train(toy_run_config(store, run), resume=True)
    got = read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, expected, strict=True):  # steps 5 and 6 were trained again, from step 4, exactly
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=1e-12)
    ckpt.read_checkpoint(newest, 0)  # and the step-6 checkpoint was written anew


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(store, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for _, path in ckpt.list_checkpoints(run):
        (path / "model.safetensors").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckpt.CheckpointError, match="no checkpoint can be resumed from"):
            train(toy_run_config(store, run), resume=True)


# --- configs ------------------------------------------------------------------------------------


def _cli_error(capsys, *args):
    from moon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_non_utf8_yaml_config_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"optim:\n  lr: 1e-4\n  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 25, line 3\)"):
        load_config(f)
    assert "not UTF-8" in _cli_error(capsys, "train", "--config", str(f), "--print-config")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                   for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
         "expands to more than"),
        ("optim:\n  lr: .inf\n", "finite number"),
        ("optim:\n  lr: .nan\n", "finite number"),
    ],
    ids=["200k-deep", "alias-bomb", "inf", "nan"],
)  # fmt: skip
def test_hostile_yaml_configs_are_refused(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.batch_size=1e20", r"optim.batch_size: must be in \[1, 1,048,576\]"),
        ("optim.steps=1e9", "optim.steps: must be in"),
        ("negatives.queue_size=1e12", "negatives.queue_size: must be in"),
        ("negatives.hard=100000", "negatives.hard: must be in"),
        ("run.seed=-1", "run.seed: must be in"),
    ],
)
def test_absurd_sizes_are_refused_before_any_work(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(preset="moon-tiny", overrides=[override])


def test_huge_batch_size_from_the_cli_is_a_one_line_error(tmp_path, capsys):
    err = _cli_error(capsys, "train", "--preset", "moon-tiny", "--data", str(tmp_path), "optim.batch_size=1e20")
    assert "optim.batch_size" in err


def test_py_specs_need_the_callers_explicit_consent(tmp_path):
    from moon.models import load_embedder

    marker = tmp_path / "ran"
    mod = tmp_path / "planted_factory.py"
    mod.write_text(f"open({str(marker)!r}, 'w').close()\ndef make(**kw):\n    raise SystemExit\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="runs Python code"):
            load_embedder("py:planted_factory:make", trainable=True)
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists()


def test_a_damaged_saved_config_on_resume_is_a_clear_error(store, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.yaml").write_bytes(b"model:\n  spec: \xff\xfe\n")
    with pytest.raises(MoonError, match="config.yaml: not UTF-8"):
        train(toy_run_config(store, run), resume=True)


# --- validation: hit rate and recall, named for what they are -----------------------------------


def test_hit_and_recall_known_answer_and_equal_to_the_benchmarks_recall():
    from moon.bench.metrics import retrieval_metrics
    from moon.train.validation import hit_and_recall_at_k

    products = np.eye(12, dtype=np.float32)
    # query 0 prefers products 0..9 (descending), bought 0 and 11 → hit, recall 1/2
    # query 1 prefers 11, bought 11 → hit, recall 1; query 2 bought nothing in the catalog → not scored
    q = np.zeros((3, 12), np.float32)
    q[0, :10] = np.linspace(1.0, 0.5, 10)
    q[1, 11] = 1.0
    relevant = [{0, 11}, {11}, set()]
    got = hit_and_recall_at_k(q, products, relevant, k=10)
    assert got == {"val_hit@10": 1.0, "val_recall@10": 0.75}
    ranked = [list(np.argsort(-row, kind="stable")) for row in q[:2]]
    assert got["val_recall@10"] == retrieval_metrics(ranked, relevant[:2])["recall@10"]
    assert hit_and_recall_at_k(q[2:], products, [set()]) is None


def test_training_logs_both_scores_and_best_is_chosen_by_recall(store, finished):
    records = [r for r in read_metrics(finished) if "val_recall@10" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(0 <= r["val_recall@10"] <= r["val_hit@10"] <= 1 for r in records)
    # every val query bought two products, so the two scores are not the same number
    assert any(r["val_recall@10"] < r["val_hit@10"] for r in records)
    best = json.loads((finished / "best.json").read_text())
    top = max(records, key=lambda r: (r["val_recall@10"], -r["step"]))
    assert best == {"step": top["step"], "val_hit@10": top["val_hit@10"], "val_recall@10": top["val_recall@10"]}
    assert math.isfinite(best["val_recall@10"])


@pytest.mark.parametrize("overrides", [{"lr": 1e30, "grad_clip": None}, {"lr": 1e30, "grad_clip": 1.0}])
def test_a_diverging_run_stops_with_an_error_and_writes_no_final(tmp_path, overrides):
    # issue #29: `optim.lr=1e30 optim.grad_clip=null` used to exit 0 with NaN weights saved in final/
    from moon.errors import TrainingError

    cfg = toy_run_config(hardening_store_at(tmp_path / "store"), tmp_path / "run", steps=6)
    cfg.optim.lr, cfg.optim.grad_clip = overrides["lr"], overrides["grad_clip"]
    with pytest.raises(TrainingError, match=r"training diverged at step \d+: .*final/ was not written") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "final").exists()
    for saved in (tmp_path / "run").rglob("*.safetensors"):  # whatever was saved before is finite
        from safetensors.torch import load_file

        assert all(bool(torch.isfinite(t).all()) for t in load_file(saved).values() if t.is_floating_point()), saved


def test_nan_gradients_are_never_applied(tmp_path, monkeypatch):
    # a NaN in the gradients stops the run before the optimizer moves any weight
    import moon.train.loop as loop
    from moon.errors import TrainingError

    cfg = toy_run_config(hardening_store_at(tmp_path / "store"), tmp_path / "run", steps=6)
    cfg.run.val_every, cfg.run.ckpt_every = 0, 0
    steps_taken = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps_taken.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    real = loop._stop_if_diverged

    def poisoned(step, loss, grad_norm, params, run_dir):
        if step == 3:
            params[0].grad.view(-1)[0] = float("nan")
            grad_norm = None  # measure again, as with optim.grad_clip null
        return real(step, loss, grad_norm, params, run_dir)

    monkeypatch.setattr(loop, "_stop_if_diverged", poisoned)
    with pytest.raises(TrainingError, match="training diverged at step 3: loss .*, gradient norm nan"):
        train(cfg)
    assert len(steps_taken) == 2


@pytest.mark.parametrize(
    "content",
    [b"[" * 10_000 + b"]" * 10_000, b'["a", "list"]', b'{"k": 1}', b"\xff\xfe not utf-8", b"{not json"],
    ids=["deep", "list", "not-strings", "not-utf8", "not-json"],
)
def test_a_damaged_image_hash_cache_is_rebuilt_not_a_traceback(tmp_path, content):
    # issue #29: a deep or wrong-shaped image-hashes.json in a run directory gave a traceback
    from PIL import Image

    from moon.train.catalog import ImageHashCache

    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(image)
    cache_file = tmp_path / "image-hashes.json"
    cache_file.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="image-hashes.json"):
        cache = ImageHashCache(cache_file)
    import hashlib

    assert cache.sha1(image) == hashlib.sha1(image.read_bytes()).hexdigest()
    cache.save()
    assert ImageHashCache(cache_file).sha1(image) == cache.sha1(image)  # rebuilt and readable again


# --- run.device: refused at start, before any work ----------------------------------------------


def test_an_unknown_device_is_a_one_line_error_before_any_work(store, tmp_path, capsys):
    out = tmp_path / "run"
    err = _cli_error(
        capsys, "train", "--preset", "moon-tiny", "--data", str(store), "--out", str(out), "run.device=tpu9"
    )
    assert len(err.strip().splitlines()) == 1 and "run.device: must be auto, cpu or cuda, got 'tpu9'" in err
    assert not out.exists()


def test_cuda_without_cuda_is_a_one_line_error_before_any_work(store, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    err = _cli_error(
        capsys, "train", "--preset", "moon-tiny", "--data", str(store), "--out", str(out), "run.device=cuda"
    )
    assert len(err.strip().splitlines()) == 1 and "run.device=cuda: this machine has no usable CUDA device" in err
    assert not out.exists()
    # the library path too, and the store is untouched
    before = sorted((p.name, p.stat().st_size) for p in store.iterdir())
    with pytest.raises(ConfigError, match="run.device=cuda"):
        train(toy_run_config(store, out, device="cuda"))
    assert not out.exists()
    assert sorted((p.name, p.stat().st_size) for p in store.iterdir()) == before
