"""Axis helpers shared by the plots: a y-axis scaled to the data, and a legend that covers nothing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: a log axis when the positive values span at least this ratio (max / min)
LOG_SPAN = 20.0


@dataclass(frozen=True)
class YScale:
    """How a plot's y-axis shows fractions: ``kind`` ``linear`` or ``log``, between ``bottom`` and
    ``top``. On a log axis a 0 cannot be drawn: :meth:`place` puts it on the bottom edge."""

    kind: str
    bottom: float
    top: float

    def place(self, values: Iterable[float]) -> list[float]:
        """Values as drawn: unchanged, except zeros (and negatives) on a log axis → ``bottom``."""
        if self.kind != "log":
            return [float(v) for v in values]
        return [float(v) if v > self.bottom else self.bottom for v in values]

    def apply(self, ax: Any, *, percent: bool = True) -> None:
        """Set the scale and limits on a matplotlib ``ax`` (tick labels in % when ``percent``)."""
        from matplotlib.ticker import FuncFormatter

        if self.kind == "log":
            ax.set_yscale("log")
        ax.set_ylim(self.bottom, self.top)
        if percent:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def fit_y(values: Iterable[float], *, log: bool | None = None, upper: float | None = 1.0) -> YScale:
    """A y-axis for ``values`` (fractions, NaN ignored) that uses its height for the data.

    ``log=None`` chooses a log axis when the positive values span at least :data:`LOG_SPAN`×
    (one model at 90 % and another at 2 % would otherwise sit on the floor together); the axis
    ends 25 % (linear) or ×1.6 (log) above the largest value, capped at ``upper``.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    positive = [v for v in xs if v > 0]
    if not positive:
        return YScale("linear", 0.0, 0.05)
    hi, lo = max(positive), min(positive)
    use_log = (hi / lo >= LOG_SPAN) if log is None else log
    if use_log:
        top = hi * 1.6
        bottom = lo / 2
        if upper is not None:
            top = min(top, upper * 1.05)
        return YScale("log", bottom, top)
    top = hi * 1.25
    if upper is not None:
        top = min(top, upper * 1.05)
    return YScale("linear", 0.0, top)


def legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str], *, ncol: int | None = None) -> Any:
    """One legend for the whole figure, in a strip under the axes, and the axes laid out above it
    (so it covers no line). Call instead of ``fig.tight_layout()``; returns the legend."""
    ncol = ncol or min(len(labels), 4) or 1
    rows = math.ceil(len(labels) / ncol)
    height_in = fig.get_size_inches()[1]
    strip = min(0.45, (0.28 * rows + 0.15) / height_in)  # figure fraction the legend needs
    legend = fig.legend(
        handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0)
    )
    fig.tight_layout(rect=(0, strip, 1, 1))
    return legend


#: fonts tried after matplotlib's default for glyphs it lacks (product titles mix in Chinese);
#: WenQuanYi Zen Hei comes with the Debian package fonts-wqy-zenhei that `make` installs
CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Droid Sans Fallback")


def text_fonts() -> list[str]:
    """``font.family`` for text that may hold CJK characters: DejaVu Sans, then the installed CJK
    fonts of :data:`CJK_FONTS` (none installed: DejaVu Sans alone, and such glyphs show as boxes)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in CJK_FONTS if name in installed]
