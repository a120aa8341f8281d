"""The epoch lines of `cnnflow train`, printed by the driver.

Rank 0 logs every epoch's metrics to the MLflow run; a thread in the driver reads them
back and prints one line per epoch. The workers' own output then never needs to reach
the terminal (Ray's `log_to_driver` is off unless --verbose), and the lines are the same
on a laptop, on a cluster and in `ray job logs`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from workflows import tracking

KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "epoch_time_s")


def epoch_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    return (
        f"epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.3f}  "
        f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.3f}  {m['images_per_s']:.0f} images/s  "
        f"{m['epoch_time_s']:.1f}s"
    )


class EpochLines:
    """`with EpochLines(uri, run_id, epochs, echo):` prints each new epoch as it is logged.

    Epochs already in the run when it starts (a resumed run) are not repeated; a resume
    is announced once, from the `resumed_from_epoch` tag rank 0 sets.
    """

    def __init__(self, uri: str, run_id: str, epochs: int, echo: Callable[[str], None], every_s: float = 2.0):
        self.run_id, self.epochs, self.echo, self.every_s = run_id, epochs, echo, every_s
        self.client = tracking.client(uri)
        self.printed: set[int] = set()
        self.resumed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cnnflow-epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self.printed = set(self._logged()[0])
        self.resumed = self._tags().get("resumed_from_epoch")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch may have been logged after the thread's last look

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a missed look is retried; the run itself is unaffected
                pass

    def _logged(self) -> list[dict[int, float]]:
        return [{m.step: m.value for m in self.client.get_metric_history(self.run_id, key)} for key in KEYS]

    def _tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    def poll(self) -> None:
        # Two queries per look while nothing is new: the driver shares the cores with training.
        resumed = self._tags().get("resumed_from_epoch")
        if resumed and resumed != self.resumed:
            self.resumed = resumed
            self.echo(f"resuming from the checkpoint of epoch {resumed}")
        if not {m.step for m in self.client.get_metric_history(self.run_id, KEYS[-1])} - self.printed:
            return
        history = self._logged()
        complete = set.intersection(*(set(h) for h in history))  # rank 0 logs all keys in one batch
        for epoch in sorted(complete - self.printed):
            self.printed.add(epoch)
            self.echo(epoch_line(epoch, self.epochs, {k: h[epoch] for k, h in zip(KEYS, history)}))
