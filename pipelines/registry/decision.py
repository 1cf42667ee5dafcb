"""The alias rule: does a new version become ``@champion`` or ``@challenger``?

Like for like: ``value`` is the new version's statistic on today's val split (the evaluate
stage's), ``champion_value`` the champion's, measured on the same images by the same code in the
same run (:mod:`pipelines.registry.champion`), not the number logged when it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.registry.aliases import CHALLENGER, CHAMPION


@dataclass(frozen=True)
class Decision:
    """``alias`` ("champion" or "challenger") and ``reason``: one line saying why."""

    alias: str
    reason: str


def decide(value: float, champion_value: float | None, *, has_champion: bool, min_ap: float,
           min_improvement: float, class_drops: dict[str, float] | None = None,
           max_class_drop: float = 1.0, metric: str = "AP", drifted: list[str] | None = None,
           drift_gate: bool = False) -> Decision:
    """"champion" iff ``value >= min_ap`` and either there is no champion, or the champion was
    measured (``champion_value`` not None), ``value > champion_value + min_improvement`` (a tie
    does not displace) and no class loses more than ``max_class_drop`` AP against it
    (``class_drops``: class -> champion's AP minus the new AP, same val split), and, with
    ``drift_gate``, no statistic of the data drifted (``drifted``: their names, see
    :mod:`pipelines.registry.drift`). Else "challenger": a champion that could not be
    measured is never displaced automatically."""
    if value < min_ap:
        return Decision(CHALLENGER, f"{metric} {value:.4f} is below register.min_ap {min_ap}: "
                                    f"registered, never @champion")
    if not has_champion:
        return Decision(CHAMPION, "no champion before")
    if drift_gate and drifted:
        return Decision(CHALLENGER, f"the data drifted from the champion's ({', '.join(drifted)}"
                                    f" past register.drift) and register.drift.gate is on: "
                                    f"look, then promote by hand")
    if champion_value is None:
        return Decision(CHALLENGER, "the champion could not be measured on this val split: "
                                    "kept (promote by hand)")
    if not value > champion_value + min_improvement:
        return Decision(CHALLENGER, f"{metric} {value:.4f} does not beat the champion's "
                                    f"{champion_value:.4f} (same val split) by more than "
                                    f"register.min_improvement {min_improvement}")
    worst = max((class_drops or {}).items(), key=lambda item: item[1], default=None)
    if worst is not None and worst[1] > max_class_drop:
        return Decision(CHALLENGER, f"class {worst[0]!r} loses {worst[1]:.4f} AP against the "
                                    f"champion (more than register.max_class_drop "
                                    f"{max_class_drop})")
    return Decision(CHAMPION, f"{metric} {value:.4f} beats the champion's {champion_value:.4f} "
                              f"on the same val split")


def class_drops(new: dict[str, float | None], champion: dict[str, float | None]
                ) -> dict[str, float]:
    """``{class: champion AP - new AP}`` for the classes the champion has an AP for (a class
    the new version has no AP for counts as 0); positive: the new version is worse."""
    return {name: ap - (new.get(name) or 0.0) for name, ap in champion.items() if ap is not None}
