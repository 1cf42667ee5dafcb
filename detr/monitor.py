"""Validation during training: the val AP curve, the best so far, early stopping.

:class:`ValMonitor` only keeps the record; :func:`detr.train.fit` runs the evaluations
(``train.eval_every_steps``), saves ``best.pth`` when :meth:`ValMonitor.record` says so, and
stops at the end of an epoch once :attr:`ValMonitor.should_stop`. Its state travels in the
checkpoint, so a resumed run selects and stops exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ValMonitor:
    """``patience``: evaluations without a better AP before stopping (0 = never).
    ``curve``: one row per evaluation, ``{"step", "epoch", <COCO statistic>: value}``."""

    patience: int = 0
    best_ap: float = -math.inf
    best_step: int = -1  # -1: nothing evaluated yet
    bad_evals: int = 0  # evaluations since the best
    curve: list[dict] = field(default_factory=list)

    def record(self, step: int, epoch: int, stats: dict[str, float]) -> bool:
        """Add an evaluation (``stats`` has ``AP``); True when its AP beats every earlier one
        (a tie keeps the earlier, cheaper-to-reach weights)."""
        self.curve.append({"step": step, "epoch": epoch, **stats})
        if stats["AP"] > self.best_ap:
            self.best_ap, self.best_step, self.bad_evals = stats["AP"], step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    @property
    def last_step(self) -> int:
        """The step of the latest evaluation (-1: none)."""
        return self.curve[-1]["step"] if self.curve else -1

    def state_dict(self) -> dict:
        return {"best_ap": self.best_ap, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "curve": [dict(row) for row in self.curve]}

    def load_state_dict(self, state: dict) -> None:
        """The record of a checkpoint; ``patience`` stays this run's (it may change)."""
        self.best_ap, self.best_step = state["best_ap"], state["best_step"]
        self.bad_evals, self.curve = state["bad_evals"], [dict(r) for r in state["curve"]]
