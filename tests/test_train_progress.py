"""The driver's epoch lines come from what rank 0 logged to MLflow (a real SQLite store)."""
from __future__ import annotations

from workflows import tracking
from workflows.train.progress import EpochLines

METRICS = {"train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.9, "images_per_s": 100.0, "epoch_time_s": 1.5}


def test_each_new_epoch_is_printed_once_and_a_resume_is_announced(mlflow_uri: str) -> None:
    run_id = tracking.client(mlflow_uri).create_run(tracking.client(mlflow_uri).create_experiment("p")).info.run_id
    tracking.log_epoch(mlflow_uri, run_id, 1, METRICS)  # logged before this driver started (a resumed run)
    lines: list[str] = []
    with EpochLines(mlflow_uri, run_id, epochs=3, echo=lines.append, every_s=0.05):
        tracking.set_tags(run_id, {"resumed_from_epoch": 1}, uri=mlflow_uri)
        tracking.log_epoch(mlflow_uri, run_id, 2, {**METRICS, "val_acc": 0.95})
        tracking.log_epoch(mlflow_uri, run_id, 3, METRICS)
    assert lines[0] == "resuming from the checkpoint of epoch 1"
    assert [line.split()[1] for line in lines[1:]] == ["2/3", "3/3"]
    assert "val_acc 0.950" in lines[1]


def test_the_moving_average_forgets_the_random_start_in_a_short_run() -> None:
    import torch
    from torch import nn

    from workflows.train.loop import moving_average

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = moving_average(model, 0.999)
    ema.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    for _ in range(300):
        ema.update_parameters(model)
    # A fixed 0.999 would keep 0.999**300 = 74% of the start; the ramped decay keeps < 5%.
    assert torch.allclose(ema.module[0].weight, torch.ones(2, 2), atol=0.01)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked)
