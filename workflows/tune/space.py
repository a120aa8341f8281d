"""What `cnnflow tune` searches, how it stops trials early, and what its trials are called.

The driver's `Tuner` samples the train options named by --search around their given
values (`search_space`), and an ASHA scheduler on val_acc stops the trials that trail
(`EarlyStopping`). ASHA compares trials at the same share of their own schedule
(`progress`, epoch / epochs), not at the same epoch: at epoch 8 a 48-epoch trial is
still warming up while a 12-epoch one is annealing, and comparing them there would
always keep the short one.
"""
from __future__ import annotations

from typing import Any

import ray.tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from cnn.models import ModelSpec, build_model
from workflows.config import TuneConfig
from workflows.train.plan import Plan

PROGRESS = "progress"  # epoch / epochs, also reported per epoch: ASHA's rungs are in shares of a schedule
REDUCTION_FACTOR = 3  # ASHA keeps the top third at each rung
# Search ranges, as factors of the given value (see TuneConfig.search's help).
# Depth goes up from the given value, never down: a stage less halves the receptive
# field, and on the photo bench every depth-3 trial stayed at chance (0.50-0.53).
# lr log-uniform in [lr / 2, lr * 2]: on the bench, peaks beyond that lost on every set
# (photo 2e-3 / 4e-3 / 8e-3: 0.84 / 0.89 / 0.84), so wider ranges only waste trials.
LR_FACTOR = 2.0
WEIGHT_DECAY_FACTOR = 10.0
SCALES = (0.0, 0.5, 1.0, 1.5)  # max_shift and label_smoothing
# The default budget is sized for a quick first run (`cnnflow train`); a search is
# there to spend more: on the photo set 20 / 24 / 30 epochs gave 0.82 / 0.87 / 0.89.
EPOCH_SCALES = (1.0, 1.5, 2.0)


def search_space(config: TuneConfig, p: Plan) -> tuple[dict[str, Any], dict[str, str]]:
    """Tune domains for the searched options, and how each reads (for the parent run).

    Options whose range would be a single value (width/depth off `simple`, a zero
    weight decay, ...) are left out: they stay as given.
    """
    space: dict[str, Any] = {}
    for name in config.search_options():
        value = getattr(config, name) if name != "epochs" else p.epochs
        if name == "lr":
            space[name] = ray.tune.loguniform(value / LR_FACTOR, value * LR_FACTOR)
        elif name == "weight_decay" and value > 0:
            space[name] = ray.tune.loguniform(value / WEIGHT_DECAY_FACTOR, min(value * WEIGHT_DECAY_FACTOR, 0.5))
        elif name == "width" and config.model == "simple":
            space[name] = _choice([max(1, value // 2), value, value * 2])
        elif name == "depth" and config.model == "simple":
            space[name] = _choice([d for d in (value, value + 1) if _builds(p, depth=d)])
        elif name == "max_shift":
            space[name] = _choice([round(s * value, 4) for s in SCALES if s * value < 0.5])
        elif name == "label_smoothing":
            space[name] = _choice([round(s * value, 4) for s in SCALES if s * value < 1])
        elif name == "epochs":
            space[name] = _choice([max(1, round(s * value)) for s in EPOCH_SCALES])
    space = {k: v for k, v in space.items() if v is not None}
    return space, {k: _describe(v) for k, v in space.items()}


def _choice(values: list[Any]) -> Any:
    values = sorted(set(values))
    return ray.tune.choice(values) if len(values) > 1 else None


def _builds(p: Plan, **options: Any) -> bool:
    """Whether `simple` builds at the data's image size with these options (depth halves it per stage)."""
    spec = ModelSpec(p.spec.name, p.spec.num_classes, p.spec.image_size, {**p.spec.options, **options})
    try:
        build_model(spec)
    except ValueError:
        return False
    return True


def _describe(domain: Any) -> str:
    if hasattr(domain, "categories"):  # tune.choice
        return "choice " + ", ".join(f"{v:g}" for v in domain.categories)
    return f"log-uniform {domain.lower:.3g}..{domain.upper:.3g}"


def starting_points(config: TuneConfig, p: Plan, space: dict[str, Any]) -> list[dict[str, Any]]:
    """The first trials: the given options (what `cnnflow train` alone would run), then
    the same options on the longest schedule searched, the one change that helped on
    every bench set where a search had the time (more epochs than a quick first run)."""
    given = {name: p.epochs if name == "epochs" else getattr(config, name) for name in space}
    points = [given]
    if "epochs" in space and config.trials > 1:
        points.append({**given, "epochs": max_epochs(space, p)})
    return points


def max_epochs(space: dict[str, Any], p: Plan) -> int:
    if "epochs" in space:
        return max(space["epochs"].categories)
    return p.epochs


class EarlyStopping(AsyncHyperBandScheduler):
    """ASHA on val_acc by share of schedule (`progress`) that lets a trial's last epoch through.

    ASHA may stop a trial at any rung, the last epoch included; stopped there, the
    trial would save no training (it is done) but lose its evaluation and logged model.
    """

    def __init__(self, *, grace: float, **kwargs: Any):
        super().__init__(time_attr=PROGRESS, max_t=1.0, grace_period=grace, reduction_factor=REDUCTION_FACTOR, **kwargs)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(PROGRESS, 0) >= 1:
            return TrialScheduler.CONTINUE
        return action


def trial_name(trial: Any) -> str:
    return trial_name_from_id(trial.trial_id)


def trial_name_from_id(trial_id: str) -> str:
    """trial-1, trial-2, ... from Tune's trial ids (<experiment>_00000, _00001, ...)."""
    return f"trial-{trial_index(trial_id) + 1}"


def trial_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"
