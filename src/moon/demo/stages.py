"""A tiny stage runner for long pipelines: each stage is cached by a key of its inputs.

A stage writes into its own folder; when it finishes, a ``.done.json`` records the key (a hash of
the stage's config and of the keys of the stages it depends on), the outputs it reports, and how
long it took. Re-running with the same key skips the work and returns the recorded outputs, so an
interrupted pipeline resumes at the first unfinished stage and a changed config re-runs exactly
the stages downstream of the change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def config_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float
    outputs: dict[str, Any]
    cached: bool = False


@dataclass
class StageRunner:
    """Runs named stages under ``root``; ``log`` receives one-line progress messages."""

    root: Path
    log: Callable[[str], None] = print
    records: list[StageRecord] = field(default_factory=list)

    def run(
        self, name: str, key_parts: Any, fn: Callable[[Path], dict[str, Any]], *, after: list[StageRecord] = ()
    ) -> StageRecord:
        """Run ``fn(stage_dir) -> outputs`` unless a finished run with the same key exists."""
        key = config_key(key_parts, [r.key for r in after])
        stage_dir = self.root / name
        done = stage_dir / ".done.json"
        if done.is_file():
            try:
                meta = json.loads(done.read_text())
            except ValueError:
                meta = {}
            if meta.get("key") == key:
                rec = StageRecord(name, key, float(meta.get("seconds", 0.0)), meta.get("outputs", {}), cached=True)
                self.log(f"[{name}] up to date (cached, took {rec.seconds:.0f} s originally)")
                self.records.append(rec)
                return rec
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        self.log(f"[{name}] running …")
        t0 = time.perf_counter()
        outputs = fn(stage_dir) or {}
        seconds = time.perf_counter() - t0
        tmp = stage_dir / ".done.json.tmp"
        tmp.write_text(json.dumps({"key": key, "seconds": seconds, "outputs": outputs}, indent=2, default=str))
        os.replace(tmp, done)
        self.log(f"[{name}] done in {seconds:.0f} s")
        rec = StageRecord(name, key, seconds, outputs)
        self.records.append(rec)
        return rec
