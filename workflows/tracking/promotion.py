"""The champion gate's registry side: `champion` moves only to a version at least as good.

MLflow has no compare-and-set on an alias, so two promotions at once could each beat the
old champion and the slower one win, whatever its score. The decision is serialised: a
lock beside a SQLite store makes a second promotion wait for the first, and the champion
is read again just before the alias moves; if it changed during the evaluation (a store
on a server, where no file lock reaches the other clients), the candidate is compared with
the new one, and so on. On a server a window of milliseconds between that last read and
the alias write remains: MLflow offers nothing to close it. Scoring a version on the data
is the caller's (`workflows/promote.py`); the scores, and which version the candidate was
compared with, are recorded here as tags on the candidate version, whatever the outcome.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from workflows.config import CHAMPION_ALIAS
from workflows.errors import CnnflowError
from workflows.tracking.connection import resolved_tracking_uri, store_lock
from workflows.tracking.registry import champion, set_champion, tag_version

MAX_RECHECKS = 5  # champions compared with before giving up (each is one evaluation)


@dataclass
class Decision:
    name: str
    version: int
    accuracy: float
    champion_version: int | None
    champion_accuracy: float | None
    promoted: bool

    def describe(self) -> str:
        if self.champion_version is None:
            before = "there was no champion"
        elif self.champion_version == self.version:
            before = "it already was the champion"
        else:
            before = f"champion v{self.champion_version}: val_acc {self.champion_accuracy:.4f}"
        verdict = f"@{CHAMPION_ALIAS} -> v{self.version}" if self.promoted else f"@{CHAMPION_ALIAS} stays on v{self.champion_version}"
        return f"{self.name} v{self.version}: val_acc {self.accuracy:.4f} ({before}); {verdict}"


def champion_gate(
    name: str,
    version: int,
    accuracy: float,
    data: str,
    *,
    score: Callable[[int], float],
    on_busy: Callable[[dict | None], None],
) -> Decision:
    """Move `champion` to `version` if its `accuracy` on DATA is >= the champion's, `score(v)`.

    `on_busy(holder)` runs when another promotion holds the lock; this one then waits.
    """
    with store_lock(resolved_tracking_uri(), "promote", on_busy=on_busy):
        current, champion_accuracy = _champion_score(name, version, accuracy, score)
        promoted = current != version and (champion_accuracy is None or accuracy >= champion_accuracy)
        if promoted:
            set_champion(name, version)
    tag_version(
        name,
        version,
        {
            "promotion_val_acc": f"{accuracy:.6f}",
            "promotion_champion_val_acc": "none" if champion_accuracy is None else f"{champion_accuracy:.6f}",
            "promotion_champion_version": "none" if current is None else current,
            "promotion_data": data,
            "promoted": str(promoted or current == version).lower(),
        },
    )
    return Decision(name, version, accuracy, current, champion_accuracy, promoted or current == version)


def _champion_score(
    name: str, version: int, accuracy: float, score: Callable[[int], float]
) -> tuple[int | None, float | None]:
    """(champion version, its accuracy on DATA), read again after each evaluation until it
    stays put: the champion this decision compares with is the one the alias still names."""
    scores = {version: accuracy}
    current = champion(name)
    for _ in range(MAX_RECHECKS):
        if current is not None and current not in scores:
            scores[current] = score(current)
        latest = champion(name)
        if latest == current:
            return current, None if current is None else scores[current]
        current = latest  # another promotion moved the alias meanwhile
    raise CnnflowError(
        f"the champion of {name!r} moved {MAX_RECHECKS} times while v{version} was compared with it; "
        "run `cnnflow promote` again when the other promotions are done"
    )
