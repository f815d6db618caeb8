"""Hardening round two, "nothing lost": ``checkpoint.json`` records the sha256 of every file, every
file is checked before it is used, and every state is checked against the objects it loads into.

A checkpoint that fails any check — a byte flipped without changing the size, a crafted
``trainer.json`` or ``rng-rank0.json`` (wrong type, missing key, absurd value, 10,000-deep
nesting), a tensor of the wrong shape — is *damaged*: ``--resume`` warns once, naming the file and
the reason, and resumes from the previous intact checkpoint exactly as a run resumed from that one
would; with none intact it is a one-line error. Checkpoints written before the sha256s still resume
(checked by size). A ``metrics.jsonl`` line that is not UTF-8 or not JSON is skipped with a
counted warning.

The crafted files are *resealed* (``checkpoint.json`` gets their new sizes and sha256s), so what
catches them is the check of their contents, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import toy_run_config  # the hardening tests' 6-step toy run
from safetensors.torch import load_file, save_file

from moon.train import checkpoints as ckpt
from moon.train import train
from moon.train.metrics_log import MAX_LINE_BYTES, read_metrics

STEP6 = "step-00000006"
DAMAGED = "skipping a damaged checkpoint"


@pytest.fixture
def store(hardening_store):
    return hardening_store


@pytest.fixture
def finished(hardening_run):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 (shared: copy it before changing it)."""
    return hardening_run


@pytest.fixture(scope="module")
def from_step4(hardening_store, hardening_run, tmp_path_factory):
    """The finished run resumed from its step-4 checkpoint (step 6 deleted): what a fallback from a
    damaged step-6 checkpoint must reproduce."""
    run = tmp_path_factory.mktemp("sums") / "ref"
    shutil.copytree(hardening_run, run)
    shutil.rmtree(run / "checkpoints" / STEP6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(toy_run_config(hardening_store, run), resume=True)
    assert not [w for w in caught if DAMAGED in str(w.message)]
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _reseal(path: Path) -> None:
    """Record the current sizes and sha256s in ``checkpoint.json`` (a *crafted* checkpoint, not a
    corrupted one: only a check of the contents can catch it)."""
    manifest = json.loads((path / "checkpoint.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = len(data)
        manifest.setdefault("sha256", {})[name] = hashlib.sha256(data).hexdigest()
    (path / "checkpoint.json").write_text(json.dumps(manifest))


def _flip_a_float_bit(path: Path) -> None:
    """Flip the lowest mantissa bit of the largest value of the largest float32 tensor in a
    safetensors file: the same size, still a valid file, a finite value a hair away."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"]
    name, info = max(tensors, key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    before = {k: v.clone() for k, v in load_file(str(path)).items()}  # (not the mmap the write changes)
    index = int(before[name].abs().flatten().argmax())
    raw[8 + n + info["data_offsets"][0] + 4 * index] ^= 0x01  # little-endian: the first byte is the lowest
    path.write_bytes(bytes(raw))
    after = load_file(str(path))  # still loads: only a checksum can tell
    assert len(raw) == path.stat().st_size
    assert not torch.equal(before[name], after[name]) and bool(torch.isfinite(after[name]).all())
    assert torch.allclose(before[name], after[name], rtol=1e-5, atol=0)


def _losses(run: Path) -> list[tuple]:
    keys = ("step", "loss", "contrastive", "aux", "lr", "temperature", "negatives_per_query", "val_recall@10")
    return [tuple(r.get(k) for k in keys) for r in read_metrics(run)]


def _resume_falls_back(store: Path, run: Path, from_step4: Path, needle: str) -> str:
    """Resume ``run`` (its step-6 checkpoint damaged): one warning naming the file and the reason,
    then exactly what a run resumed from step 4 does — the same losses and a step-6 checkpoint
    byte-identical to that run's. Returns the warning."""
    with pytest.warns(RuntimeWarning, match=DAMAGED) as record:
        train(toy_run_config(store, run), resume=True)
    damaged = [str(w.message) for w in record if DAMAGED in str(w.message)]
    assert len(damaged) == 1, damaged
    message = damaged[0]
    assert "\n" not in message and "Traceback" not in message
    assert f"{run / 'checkpoints' / STEP6}/" in message  # names the file …
    assert re.search(needle, message), message  # … and the reason
    assert [r[0] for r in _losses(run)] == [1, 2, 3, 4, 5, 6]
    assert _losses(run) == _losses(from_step4)
    for name in ("model.safetensors", "trainer.safetensors"):  # the lost steps 5-6 trained again, exactly
        assert (run / "checkpoints" / STEP6 / name).read_bytes() == (
            from_step4 / "checkpoints" / STEP6 / name
        ).read_bytes()
    ckpt.read_checkpoint(run / "checkpoints" / STEP6, 0)  # the rewritten checkpoint is intact
    return message


# --- what checkpoint.json records ------------------------------------------------------------------


def test_checkpoint_json_records_the_size_and_sha256_of_every_file(finished):
    for _, path in ckpt.list_checkpoints(finished):
        manifest = json.loads((path / "checkpoint.json").read_text())
        names = {p.name for p in path.iterdir()} - {"checkpoint.json"}
        assert set(manifest["files"]) == set(manifest["sha256"]) == names
        for name in names:
            data = (path / name).read_bytes()
            assert manifest["files"][name] == len(data)
            assert manifest["sha256"][name] == hashlib.sha256(data).hexdigest()


# --- same-size corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors"])
def test_a_same_size_byte_flip_falls_back_to_the_previous_checkpoint(store, finished, from_step4, tmp_path, name):
    run = _copy(finished, tmp_path)
    f = run / "checkpoints" / STEP6 / name
    _flip_a_float_bit(f)
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: changed since it was written"):
        ckpt.read_checkpoint(f.parent, 0)
    _resume_falls_back(store, run, from_step4, rf"{name}: changed since it was written \(sha256 [0-9a-f]{{12}}…")


# --- crafted JSON files ------------------------------------------------------------------------------


def _deep(text: str, depth: int = 10_000) -> str:
    return text.replace('"@DEEP@"', "[" * depth + "]" * depth)


def _edit_trainer(edit):
    def apply(path: Path) -> None:
        f = path / "trainer.json"
        state = json.loads(f.read_text())
        edit(state)
        f.write_text(_deep(json.dumps(state)))

    return apply


def _edit_trainer_tensor(key_of, change):
    """Replace a tensor of ``trainer.safetensors`` (``key_of(trainer.json)`` names it) by ``change(tensor)``."""

    def apply(path: Path) -> None:
        key = key_of(json.loads((path / "trainer.json").read_text()))
        f = path / "trainer.safetensors"
        tensors = {k: v.clone() for k, v in load_file(str(f)).items()}
        tensors[key] = change(tensors[key]).contiguous()
        save_file(tensors, str(f))

    return apply


def _edit_rng(edit):
    def apply(path: Path) -> None:
        f = path / "rng-rank0.json"
        state = json.loads(f.read_text())
        edit(state)
        f.write_text(json.dumps(state))

    return apply


def _set(keys, value):
    def edit(state):
        for k in keys[:-1]:
            state = state[k]
        state[keys[-1]] = value

    return edit


def _delete(keys):
    def edit(state):
        for k in keys[:-1]:
            state = state[k]
        del state[keys[-1]]

    return edit


CRAFTED = {
    # trainer.json: wrong types
    "lr-is-text": (
        _edit_trainer(_set(["optimizer", "param_groups", 0, "lr"], "fast")),
        r"trainer.json: optimizer.param_groups\[0\].lr must be a finite number, got str 'fast'",
    ),
    "scheduler-is-a-list": (
        _edit_trainer(_set(["scheduler"], [1, 2])),
        r"trainer.json: scheduler must be a mapping, got list",
    ),
    # trainer.json: missing keys
    "no-queue": (_edit_trainer(_delete(["queue"])), r"trainer.json: no 'queue' entry"),
    "no-exp-avg": (
        _edit_trainer(_delete(["optimizer", "state", "$dict", 0, 1, "exp_avg"])),
        r"trainer.json: optimizer.state\[0\] has no 'exp_avg'",
    ),
    # trainer.json: absurd values
    "last-epoch-minus-a-million": (
        _edit_trainer(_set(["scheduler", "last_epoch"], -1_000_000)),
        r"trainer.json: scheduler.last_epoch is -1000000, but the checkpoint is of step 6",
    ),
    "queue-ptr-10-to-the-12": (
        _edit_trainer(_set(["queue", "ptr"], 10**12)),
        r"trainer.json: queue.ptr must be in \[0, 8\)",
    ),
    "queue-product-10-to-the-9": (
        _edit_trainer_tensor(
            lambda e: e["queue"]["products"]["$tensor"], lambda t: t.index_fill(0, torch.tensor([0]), 10**9)
        ),
        r"trainer.json: queue.products holds product 1000000000, but the catalog has 24 products",
    ),
    "negative-weight-decay": (
        _edit_trainer(_set(["optimizer", "param_groups", 0, "weight_decay"], -5.0)),
        r"trainer.json: optimizer.param_groups\[0\].weight_decay is out of range",
    ),
    # trainer.json: 10,000-deep nesting
    "10k-deep": (_edit_trainer(_set(["config"], "@DEEP@")), r"trainer.json: JSON nested too deeply"),
    # rng-rank0.json
    "rng-python-state-is-a-list": (
        _edit_rng(_set(["python"], [3, [1, 2], None])),
        r"rng-rank0.json: python: not a random.Random state",
    ),
    "rng-no-torch-state": (_edit_rng(_delete(["torch"])), r"rng-rank0.json: no 'torch' state"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_state_file_falls_back_to_the_previous_checkpoint(store, finished, from_step4, tmp_path, case):
    craft, needle = CRAFTED[case]
    run = _copy(finished, tmp_path)
    newest = run / "checkpoints" / STEP6
    craft(newest)
    _reseal(newest)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_checkpoint(newest, 0, _expect(store))
    assert "\n" not in str(err.value)
    _resume_falls_back(store, run, from_step4, needle)


def _expect(store: Path) -> ckpt.Expected:
    """What the trainer expects of a checkpoint of the ``_config`` run (built as the trainer does)."""
    from moon.train.dataset import open_training_data
    from moon.train.losses import ContrastiveLoss
    from moon.train.memory import MemoryQueue
    from moon.train.optim import build_optimizer, build_scheduler
    from moon.train.tuning import build_trainable

    config = toy_run_config(store, store.parent / "unused")
    model = build_trainable(config.model.spec, config.model.overrides)
    loss = ContrastiveLoss(config.loss.temperature, learnable=True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + [("loss.log_scale", loss.log_scale)]
    optimizer = build_optimizer(named, config.optim)
    queue = MemoryQueue(config.negatives.queue_size, model.dim, config.negatives.queue_max_age)
    products = len(open_training_data(store).catalog.products)
    return ckpt.expected_states(
        model, optimizer, build_scheduler(optimizer, config.optim), loss, queue, products=products
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("size-is-text", r"checkpoint.json: files.model.safetensors must be a size in bytes, got 'big'"),
        ("10k-deep", r"checkpoint.json: JSON nested too deeply"),
        ("over-1-MiB", r"checkpoint.json: too large \([0-9,]+ bytes > limit 1,048,576 bytes"),
        ("not-utf8", r"checkpoint.json: not UTF-8 \(byte 0xe9 at offset 2\)"),
    ],
)
def test_a_crafted_checkpoint_json_falls_back_to_the_previous_checkpoint(
    store, finished, from_step4, tmp_path, case, needle
):
    run = _copy(finished, tmp_path)
    f = run / "checkpoints" / STEP6 / "checkpoint.json"
    manifest = json.loads(f.read_text())
    if case == "size-is-text":
        manifest["files"]["model.safetensors"] = "big"
        f.write_text(json.dumps(manifest))
    elif case == "10k-deep":
        f.write_text(json.dumps({**manifest, "extra": "@DEEP@"}).replace('"@DEEP@"', "[" * 10_000 + "]" * 10_000))
    elif case == "over-1-MiB":
        f.write_text(json.dumps(manifest) + " " * (2 << 20))  # valid JSON: only the size is wrong
    else:
        f.write_bytes(b'{"\xe9": 1, ' + f.read_bytes()[1:])
    _resume_falls_back(store, run, from_step4, needle)


# --- tensors of the wrong shape ------------------------------------------------------------------------


def _first4(t: torch.Tensor) -> torch.Tensor:
    return t[:4]


def _reshape_model(path: Path) -> None:
    f = path / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(f)).items()}
    state["proj.weight"] = state["proj.weight"].T.contiguous()  # (8, 16) → (16, 8)
    save_file(state, str(f))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("model-weight", r"model.safetensors: proj.weight is a \(16, 8\) float32 tensor, the model's is \(8, 16\)"),
        ("optimizer-exp-avg", r"trainer.json: optimizer.state\[0\].exp_avg is a \(4, 16\) float32 tensor"),
        ("queue-vectors", r"trainer.json: queue.vectors is a \(4, 8\) float32 tensor, expected shape \(8, 8\)"),
    ],
)
def test_a_tensor_of_the_wrong_shape_falls_back_to_the_previous_checkpoint(
    store, finished, from_step4, tmp_path, case, needle
):
    run = _copy(finished, tmp_path)
    newest = run / "checkpoints" / STEP6
    if case == "model-weight":
        _reshape_model(newest)
    elif case == "optimizer-exp-avg":  # parameter 0 is tok.weight, (257, 16)
        _edit_trainer_tensor(lambda e: e["optimizer"]["state"]["$dict"][0][1]["exp_avg"]["$tensor"], _first4)(newest)
    else:
        _edit_trainer_tensor(lambda e: e["queue"]["vectors"]["$tensor"], _first4)(newest)
    _reseal(newest)
    _resume_falls_back(store, run, from_step4, needle)


# --- nothing intact ------------------------------------------------------------------------------------


def test_every_checkpoint_damaged_is_a_one_line_error(store, finished, tmp_path, capsys):
    from moon.cli import main

    run = _copy(finished, tmp_path)
    checkpoints = ckpt.list_checkpoints(run)
    assert [s for s, _ in checkpoints] == [2, 4, 6]
    for _, path in checkpoints:
        _flip_a_float_bit(path / "model.safetensors")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(store, run).to_yaml())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exc:
            main(["train", "--config", str(config_file), "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert "no checkpoint can be resumed from" in err
    for _, path in checkpoints:
        assert f"{path / 'model.safetensors'}: changed since it was written" in err


# --- checkpoints from before the sha256s -------------------------------------------------------------


def _strip_sha256(run: Path) -> None:
    for _, path in ckpt.list_checkpoints(run):
        f = path / "checkpoint.json"
        manifest = json.loads(f.read_text())
        manifest.pop("sha256", None)  # (absent from checkpoints written before this change)
        f.write_text(json.dumps(manifest))  # {"format": 1, "step": …, "files": {name: size}}


def test_checkpoints_without_sha256s_still_resume(store, finished, tmp_path):
    run = _copy(finished, tmp_path)
    _strip_sha256(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(toy_run_config(store, run, steps=8), resume=True)  # optim.steps may change on resume
    assert not [w for w in caught if DAMAGED in str(w.message)]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6, 7, 8]
    newest = ckpt.latest_checkpoint(run)[1]
    assert newest.name == "step-00000008" and "sha256" in json.loads((newest / "checkpoint.json").read_text())


def test_checkpoints_without_sha256s_are_still_checked_by_size(store, finished, from_step4, tmp_path):
    run = _copy(finished, tmp_path)
    _strip_sha256(run)
    f = run / "checkpoints" / STEP6 / "trainer.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _resume_falls_back(store, run, from_step4, r"trainer.safetensors: truncated or changed")


# --- metrics.jsonl --------------------------------------------------------------------------------------


def test_a_non_utf8_line_in_metrics_jsonl_is_skipped_on_resume(store, finished, from_step4, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / STEP6)  # resume from step 4: steps 5 and 6 are logged again
    f = run / "metrics.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    lines[2:2] = [b'{"step": 2, "note": "caf\xe9"}\n', b"not JSON\n"]
    f.write_bytes(b"".join(lines))
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: skipped 2 unreadable lines \(line 3: not UTF-8"):
        train(toy_run_config(store, run), resume=True)
    assert _losses(run) == _losses(from_step4)
    f.read_bytes().decode("utf-8")  # the bad lines are gone


def test_read_metrics_skips_bad_lines_with_one_counted_warning(tmp_path):
    lines = [
        b'{"step": 1, "loss": 0.5}\n',
        b'{"step": 2, "loss": "caf\xe9"}\n',  # not UTF-8
        b"not JSON\n",
        b"[" * 10_000 + b"]" * 10_000 + b"\n",  # nested 10,000 deep
        b"[1, 2]\n",  # JSON, not an object
        b'{"step": 3, "x": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}\n',  # over the line limit
        b'{"step": 4, "loss": 0.25}\n',
        b'{"step": 5, "lo',  # torn by a crash: skipped without a warning
    ]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(lines))
    with pytest.warns(RuntimeWarning) as record:
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 4]
    assert len(record) == 1
    assert re.search(
        r"skipped 5 unreadable lines \(line 2: not UTF-8 \(byte 0xe9 at offset 24\)\)", str(record[0].message)
    )
