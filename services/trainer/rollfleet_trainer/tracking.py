"""Experiment tracking: the trainer's step metrics to Weights & Biases and MLflow, beside
metrics.jsonl and Prometheus (spec.tracking). The leader rank logs; the run is named after
the job and carries the job's spec as its config.

    tracking:
      wandb: {project: countdown, mode: offline}          # online with WANDB_API_KEY
      mlflow: {trackingUri: http://mlflow:5000, experiment: countdown}

    trackers = Trackers.open(job, run_dir)   # nothing is imported when tracking is off
    trackers.log(record)                     # one metrics.jsonl record: numbers by step
    trackers.close(result)                   # the final result as the run's summary

A run resumed after a crash logs into the same W&B run (its id is kept in the run
directory) and the same MLflow run (found by its `rollfleet.run_dir` tag), so a restart
continues one curve. A tracker that fails while logging is logged and switched off: the
job goes on, as it does when Prometheus is not scraped.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer")

WANDB_ID_FILE = "wandb-run-id"  # in the run directory: a resumed run logs into the same run
RUN_DIR_TAG = "rollfleet.run_dir"


def numbers(record: dict) -> dict[str, float]:
    """The record's finite numbers (a metrics.jsonl record also holds None and lists)."""
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested spec as dotted keys (MLflow parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


class WandbTracker:
    def __init__(self, settings, job, run_dir: Path, config: dict):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=job.metadata.name,
            config=config,
            dir=str(run_dir),
            mode=settings.mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, record: dict) -> None:
        self.run.log(numbers(record), step=int(record["step"]))

    def close(self, result: dict) -> None:
        self.run.summary.update(numbers(result))
        self.run.finish()


class MlflowTracker:
    """Through MlflowClient and the run's id: mlflow's fluent API keeps the active run per
    thread, and the trainer logs from a worker thread."""

    def __init__(self, settings, job, run_dir: Path, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(settings.trackingUri)
        name = settings.experiment or job.metadata.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir.resolve()}'"
        )
        if found:  # a resumed run continues its curve
            self.run_id = found[0].info.run_id
            return
        run = self.client.create_run(
            experiment_id, run_name=job.metadata.name, tags={RUN_DIR_TAG: str(run_dir.resolve())}
        )
        self.run_id = run.info.run_id
        # MLflow keeps parameters as text of at most 6,000 characters each, 100 per call
        params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log(self, record: dict) -> None:
        self._metrics(numbers(record), int(record["step"]))

    def close(self, result: dict) -> None:
        self._metrics({f"result.{k}": v for k, v in numbers(result).items()}, 0)
        self.client.set_terminated(self.run_id)


class Trackers:
    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def open(cls, job, run_dir: Path) -> Trackers:
        settings = job.spec.tracking
        config = job.spec.model_dump(mode="json", by_alias=True)
        trackers = []
        if settings.wandb is not None:
            trackers.append(WandbTracker(settings.wandb, job, run_dir, config))
        if settings.mlflow is not None:
            trackers.append(MlflowTracker(settings.mlflow, job, run_dir, config))
        return cls(trackers)

    def _each(self, what: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception:
                log.exception(
                    "%s failed to %s; it is off for the rest of the run",
                    type(tracker).__name__,
                    what,
                )
                self.trackers.remove(tracker)

    def log(self, record: dict) -> None:
        self._each("log", record)

    def close(self, result: dict) -> None:
        self._each("close", result)
