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


HOUSE_RULE = re.compile(
    r"weights_only *= *False|trust_remote_code *= *True|pickle\.loads?\(|allow_pickle *= *True|yaml\.load\(|shell *= *True"
)


def test_nothing_in_moon_unpickles_trusts_remote_code_or_shells_out():
    """The grep of issue #16 over the whole package: it must find nothing."""
    import moon

    sources = list(Path(moon.__file__).parent.rglob("*.py"))
    offenders = [
        f"{p.relative_to(Path(moon.__file__).parent)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for p in sources
        for text in [p.read_text(encoding="utf-8")]
        for m in HOUSE_RULE.finditer(text)
    ]
    assert offenders == []
