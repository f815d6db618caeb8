"""Index and server files are loaded without pickle: no module of moon.index / moon.serve uses it."""

import re
from pathlib import Path

import moon.index
import moon.serve

FORBIDDEN = re.compile(
    r"import (c?pickle|joblib|dill)|pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|np\.load\("
)


def test_no_pickle_loaders_in_index_and_serve():
    sources = [p for pkg in (moon.index, moon.serve) for p in Path(pkg.__file__).parent.rglob("*.py")]
    assert len(sources) >= 8
    offenders = [f"{p.name}: {m.group(0)}" for p in sources for m in FORBIDDEN.finditer(p.read_text(encoding="utf-8"))]
    assert offenders == []
