"""Embedding collapse: one definition, used by the trainer's warning and by the reports.

Per logged step the trainer records ``product_cosine`` (the mean cosine between the step's
purchased-product vectors, :func:`mean_pairwise_cosine`) and ``chance_loss`` (:func:`chance_loss`:
``log(1 + negatives per query)``, the InfoNCE loss of a model that scores all of a query's
candidates alike). From those and the step's contrastive loss:

* a step is **collapsed** when ``product_cosine >= COSINE_THRESHOLD`` (0.99): the model gives
  the batch's products almost the same vector, so it cannot rank a query's product above the
  others, whatever the loss says. The loss is *not* part of this test on purpose: with a memory
  queue a collapsed model's loss sits *below* chance (it can still reject the queue's vectors
  from earlier, different weights — measured: 3.4–4.5 against a chance level of 5.64, see
  docs/training.md), so "loss at chance" misses collapse exactly where the queue is on;
* otherwise a step is **learning** when its loss is at least ``LEARNING_MARGIN`` (0.1 nats) below
  that step's chance loss, else **at chance**;
* a run **has collapsed** at the first step that ends ``PATIENCE`` (10) collapsed logged steps in
  a row after the warm-up (a fresh model starts anywhere). That is when :class:`CollapseWatch`
  warns, and the step :func:`assess` reports.

:class:`RelapseWatch` catches the other failure: a run that **learned, then fell back** (loss
climbing back towards chance while the vectors drift together, without reaching the 0.99 cosine of
a full collapse). Its measure is the step's **margin**, ``chance_loss - loss``, averaged over the last
``RELAPSE_WINDOW`` (5) logged steps; after the warm-up it keeps the best such mean (the **peak**).
A run **has relapsed** at the first step that ends ``PATIENCE`` (10) steps in a row whose mean margin
is at most ``RELAPSE_KEEP`` (half) of a peak of at least ``RELAPSE_MIN_PEAK`` (0.5 nats): it has
lost more than half of what it had learned, and for long enough that batch noise is not the cause.

:func:`assess` turns a run's metrics records into a :class:`Health` verdict: ``collapsed`` (has
collapsed, and the last ``window`` steps' mean cosine is still ≥ the threshold), ``recovered``
(had collapsed, is no longer), ``near collapse`` (the last steps are collapsed but fewer than
``PATIENCE`` of them), ``relapsed`` (has relapsed and is still down at its last step), else
``learning`` / ``at chance`` from the last steps' mean loss and mean chance loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

COSINE_THRESHOLD = 0.99
PATIENCE = 10
LEARNING_MARGIN = 0.1
RELAPSE_WINDOW = 5
RELAPSE_KEEP = 0.5
RELAPSE_MIN_PEAK = 0.5

STATES = ("collapsed", "learning", "at chance")
VERDICTS = ("collapsed", "recovered", "near collapse", "relapsed", "learning", "at chance", "no data")


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the rows of ``(n, d)`` ``vectors`` (``nan`` for n < 2)."""
    n = vectors.shape[0]
    if n < 2:
        return float("nan")
    v = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    total = v.sum(0)
    # sum over all ordered pairs i != j of <v_i, v_j> = |sum v|^2 - sum |v_i|^2
    off = float(total @ total) - float((v * v).sum())
    return off / (n * (n - 1))


def chance_loss(negatives_per_query: float) -> float:
    """``log(1 + negatives_per_query)``: the InfoNCE loss when all of a query's candidates (its
    positive and its negatives) get the same score."""
    return math.log1p(max(0.0, float(negatives_per_query)))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def step_state(cosine: float | None, loss: float | None, chance: float | None) -> str:
    """``collapsed``, ``learning`` or ``at chance`` for one step (see the module docstring)."""
    if _finite(cosine) and cosine >= COSINE_THRESHOLD:  # type: ignore[operator]
        return "collapsed"
    if _finite(loss) and _finite(chance) and loss <= chance - LEARNING_MARGIN:  # type: ignore[operator]
        return "learning"
    return "at chance"


class CollapseWatch:
    """Counts collapsed steps in a row after ``start`` (the warm-up); the first time the streak
    reaches ``patience`` it warns once (``warn=True``) with the numbers of that step.

    The trainer feeds it every step; :func:`assess` replays a run's logged steps through it (the
    same steps with the default ``run.log_every`` 1), so both name the same step."""

    def __init__(
        self,
        threshold: float = COSINE_THRESHOLD,
        patience: int = PATIENCE,
        start: int = 0,
        *,
        warn: bool = True,
    ):
        self.threshold = threshold
        self.patience = patience
        self.start = start
        self.warn = warn
        self.run = 0
        self.warned = False
        self.collapsed_at: int | None = None

    def update(self, step: int, cosine: float, loss: float | None = None, chance: float | None = None) -> bool:
        """Feed step ``step``'s product cosine (and loss and chance loss, for the message);
        returns True (and warns) the first time the run has collapsed."""
        if step <= self.start or not _finite(cosine):  # nan: fewer than 2 products
            return False
        self.run = self.run + 1 if cosine >= self.threshold else 0
        if self.run >= self.patience and not self.warned:
            self.warned = True
            self.collapsed_at = step
            if self.warn:
                warnings.warn(
                    collapse_message(step, self.run, cosine, loss, chance, self.threshold), RuntimeWarning, stacklevel=2
                )
            return True
        return False


class RelapseWatch:
    """Warns once (``warn=True``) when a run that had learned loses more than ``keep``'s complement
    of it: the mean margin ``chance_loss - loss`` over the last ``window`` steps has been at most
    ``keep × peak`` for ``patience`` steps in a row, where ``peak`` (≥ ``min_peak`` nats) is the best
    such mean after ``start`` (the warm-up). See the module docstring; :func:`assess` replays it."""

    def __init__(
        self,
        start: int = 0,
        *,
        window: int = RELAPSE_WINDOW,
        keep: float = RELAPSE_KEEP,
        min_peak: float = RELAPSE_MIN_PEAK,
        patience: int = PATIENCE,
        warn: bool = True,
    ):
        self.start, self.window, self.keep, self.min_peak, self.patience, self.warn = (
            start, window, keep, min_peak, patience, warn
        )  # fmt: skip
        self.margins: list[float] = []
        self.peak = float("-inf")
        self.peak_step: int | None = None
        self.run = 0
        self.relapsed_at: int | None = None

    def update(self, step: int, loss: float | None, chance: float | None, cosine: float | None = None) -> bool:
        """Feed step ``step``'s contrastive loss and chance loss (and product cosine, for the
        message); returns True (and warns) the first time the run has relapsed."""
        if step <= self.start or not (_finite(loss) and _finite(chance)):
            return False
        self.margins = (self.margins + [float(chance) - float(loss)])[-self.window :]  # type: ignore[arg-type]
        if len(self.margins) < self.window:
            return False
        mean = sum(self.margins) / len(self.margins)
        if mean > self.peak:
            self.peak, self.peak_step = mean, step
        fallen = self.peak >= self.min_peak and mean <= self.keep * self.peak
        self.run = self.run + 1 if fallen else 0
        if self.run >= self.patience and self.relapsed_at is None:
            self.relapsed_at = step
            if self.warn:
                warnings.warn(relapse_message(step, self, mean, cosine), RuntimeWarning, stacklevel=2)
            return True
        return False


def relapse_message(step: int, watch: RelapseWatch, margin: float, cosine: float | None) -> str:
    """The trainer's relapse warning, true to the numbers it quotes."""
    text = (
        f"training has relapsed at step {step}: over the last {watch.window} steps the loss is on average "
        f"{margin:.2f} below the chance level, against {watch.peak:.2f} at step {watch.peak_step}; it has stayed "
        f"under {watch.keep:.0%} of that for {watch.run} steps in a row, so the model has lost more than half of what "
        "it had learned."
    )
    if _finite(cosine):
        text += f" The batch's product vectors have a mean cosine of {cosine:.3f} (collapse: ≥ {COSINE_THRESHOLD})."
    return (
        text + " The best checkpoint by validation (best/) is kept. A memory queue (negatives.queue_size) made runs "
        "relapse like this in our measurements and training without it was stable; a smaller optim.lr may help too. "
        "See docs/training.md (A stable recipe)"
    )


def collapse_message(
    step: int, streak: int, cosine: float, loss: float | None, chance: float | None, threshold: float = COSINE_THRESHOLD
) -> str:
    """The trainer's warning, true to the numbers it quotes."""
    text = (
        f"embeddings have collapsed at step {step}: the mean cosine between the batch's product vectors has been "
        f">= {threshold} for {streak} steps in a row (now {cosine:.4f}), so the model gives every product almost the "
        "same vector and cannot rank a query's product above the others."
    )
    if _finite(loss) and _finite(chance):
        level = f"the chance level {chance:.3f} = log({math.exp(chance):.0f} candidates per query)"  # type: ignore[arg-type]
        gap = chance - loss  # type: ignore[operator]
        if gap >= LEARNING_MARGIN:
            text += (
                f" The loss, {loss:.3f}, is {gap:.2f} below {level}, but with products this alike that gap does not "
                "come from telling them apart (memory-queue vectors from earlier steps are easier to reject)."
            )
        elif gap <= -LEARNING_MARGIN:
            text += f" The loss, {loss:.3f}, is {-gap:.2f} above {level}."
        else:
            text += f" The loss, {loss:.3f}, is at {level}."
    return (
        text + " It may not recover by itself: start from pretrained weights, lower optim.lr, or give more weight to "
        "text/multimodal queries (data.modality_mix); see docs/training.md"
    )


@dataclass
class Health:
    """A run's training health, from its metrics records (see :func:`assess`)."""

    verdict: str  # one of VERDICTS
    steps: int  # logged steps with a loss
    collapsed_at: int | None  # the step CollapseWatch warns at (None: never)
    collapsed_steps: int  # logged steps after the warm-up whose state is "collapsed"
    relapsed_at: int | None  # the step RelapseWatch warns at (None: never)
    first_loss: float  # mean of the first `window` steps
    first_chance: float
    last_loss: float  # mean of the last `window` steps
    last_chance: float
    last_cosine: float  # nan when the run did not log product_cosine


def record_chance(record: Mapping[str, Any]) -> float:
    """A metrics record's chance loss (older runs logged only ``negatives_per_query``)."""
    if _finite(record.get("chance_loss")):
        return float(record["chance_loss"])
    if _finite(record.get("negatives_per_query")):
        return chance_loss(record["negatives_per_query"])
    return float("nan")


def record_loss(record: Mapping[str, Any]) -> float:
    """The loss that the chance level is for: the contrastive (InfoNCE) part, else the total."""
    value = record.get("contrastive", record.get("loss"))
    return float(value) if _finite(value) else float("nan")


def assess(records: Iterable[Mapping[str, Any]], *, warmup: int = 0, window: int = 5) -> Health:
    """The :class:`Health` of a run from its ``metrics.jsonl`` records (those without a loss, e.g.
    a step-0 validation, are skipped); ``warmup``: the run's ``optim.warmup_steps``."""
    recs = [r for r in records if _finite(r.get("loss"))]
    nan = float("nan")
    if not recs:
        return Health("no data", 0, None, 0, None, nan, nan, nan, nan, nan)
    watch = CollapseWatch(start=warmup, warn=False)
    relapse = RelapseWatch(start=warmup, warn=False)
    collapsed_steps = 0
    for r in recs:
        relapse.update(int(r["step"]), record_loss(r), record_chance(r))
        cos = r.get("product_cosine")
        if _finite(cos):
            watch.update(int(r["step"]), float(cos))
            if int(r["step"]) > warmup and cos >= COSINE_THRESHOLD:
                collapsed_steps += 1

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else nan

    first, last = recs[:window], recs[-window:]
    cosines = [float(r["product_cosine"]) for r in last if _finite(r.get("product_cosine"))]
    h = Health(
        verdict="",
        steps=len(recs),
        collapsed_at=watch.collapsed_at,
        collapsed_steps=collapsed_steps,
        relapsed_at=relapse.relapsed_at,
        first_loss=mean([record_loss(r) for r in first]),
        first_chance=mean([record_chance(r) for r in first]),
        last_loss=mean([record_loss(r) for r in last]),
        last_chance=mean([record_chance(r) for r in last]),
        last_cosine=mean(cosines),
    )
    end = step_state(h.last_cosine, h.last_loss, h.last_chance)
    if watch.collapsed_at is not None:
        h.verdict = "collapsed" if end == "collapsed" else "recovered"
    elif end == "collapsed":
        h.verdict = "near collapse"
    elif relapse.relapsed_at is not None and relapse.run > 0:  # relapsed, and still down at the end
        h.verdict = "relapsed"
    else:
        h.verdict = end
    return h
