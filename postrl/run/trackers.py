"""Experiment trackers: every row of ``RUN/metrics.jsonl`` and the run's config also go to TensorBoard,
Weights & Biases, MLflow or Trackio, as chosen by ``run.report_to`` (docs/tracking.md).

``metrics.jsonl`` stays the record of the run (reports and resume read it); a tracker is a view of it:

=============  ===========================================  =============================================
name           where it writes (by default)                 resume
=============  ===========================================  =============================================
tensorboard    RUN/tensorboard/events.out.tfevents.*        same directory; points after the checkpoint
                                                            are purged (SummaryWriter ``purge_step``)
wandb          RUN/wandb/run-* (offline-run-* offline)      same W&B run (id kept in RUN/wandb_id)
mlflow         RUN/mlflow/mlflow.db + RUN/mlflow/artifacts  same MLflow run (id kept in RUN/mlflow_run_id)
               or ``MLFLOW_TRACKING_URI``
trackio        ``TRACKIO_DIR`` (default ~/.cache/           same Trackio run (by name)
               huggingface/trackio/PROJECT.db)
=============  ===========================================  =============================================

Each tracker logs the numbers of a row (ints, floats; booleans as 0/1) at the row's step and leaves out the
rest (strings, None, lists) and the ``step`` key itself (it is the x-axis). NaN and infinity are passed on:
all four libraries accept them.
"""

from __future__ import annotations

import difflib
import importlib
import json
import numbers
import os
import re
import secrets
import textwrap
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from postrl.config import ConfigError


class Tracker(Protocol):
    name: str

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log one ``metrics.jsonl`` row at ``step``."""

    def close(self) -> None:
        """Flush and finish the run."""


def scalars(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of one metrics row, without its ``step``: booleans become 0/1; strings, None, lists and
    dicts are left out; NaN and infinity are kept."""
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if key == "step" or not isinstance(value, numbers.Real):
            continue
        out[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON types only (paths, tuples and the like as strings or lists)."""
    return json.loads(json.dumps(config, default=str))


def config_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(_plain(config), sort_keys=False)


class TensorBoardTracker:
    """Scalars with ``add_scalar`` and the config as text (tab TEXT, tag ``config``)."""

    name, package = "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run re-runs the steps after its checkpoint: purge_step makes TensorBoard drop the points
        # this directory already holds for those steps (it keeps steps <= resume_step, like metrics.jsonl).
        first = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else first)
        # indented: TensorBoard renders text as Markdown, and an indented block is shown verbatim
        self.writer.add_text("config", textwrap.indent(config_yaml(config), "    "), first)
        self.writer.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # one small write per step, so that a live TensorBoard is current

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """``wandb.init`` / ``run.log(..., step=)`` / ``run.finish()``; project from ``WANDB_PROJECT`` (default
    ``postrl``); ``WANDB_MODE=offline`` writes RUN/wandb/offline-run-*, for ``wandb sync`` later."""

    name, package = "wandb", "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        id_file = run_dir / "wandb_id"  # the same W&B run on resume
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "postrl"), name=run_name, dir=str(run_dir),
                              id=run_id, resume="allow", config=_plain(config))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_key(key: str) -> str:
    """A metric or param name that MLflow accepts (letters, digits, ``_ - . /`` and spaces; no empty, ``.``
    or ``..`` path parts): ``@`` becomes ``_at_`` (``eval/pass@1`` -> ``eval/pass_at_1``), any other character
    ``_`` (``:`` too, which MLflow refuses on Windows)."""
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", key.replace("@", "_at_"))
    return "/".join(part if part not in ("", ".", "..") else "_" for part in key.split("/"))


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MlflowTracker:
    """Metrics with ``log_batch``; the flattened config as params (``train.lr``; values cut to MLflow's
    length limit) and whole as the artifact ``config.yaml``. The tracking URI is ``MLFLOW_TRACKING_URI`` or
    a SQLite store in the run directory (MLflow 3 refuses the old ``file:`` store by default); the
    experiment is ``MLFLOW_EXPERIMENT_NAME`` (default ``postrl``). Metric names go through :func:`mlflow_key`.
    A client object is used, not ``mlflow.start_run``, so that the process's active MLflow run and tracking
    URI are left alone."""

    name, package = "mlflow", "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        except ImportError:  # moved or renamed: a conservative limit
            MAX_PARAM_VAL_LENGTH = 500
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            local = (run_dir / "mlflow").resolve()
            local.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{local / 'mlflow.db'}", (local / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "postrl")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(experiment_name, artifact_location=artifacts))
        id_file = run_dir / "mlflow_run_id"  # the same MLflow run on resume
        self.run_id, logged = None, {}
        if id_file.exists():
            try:
                run = self.client.get_run(id_file.read_text().strip())
                self.run_id, logged = run.info.run_id, run.data.params
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:  # not in this tracking store (another MLFLOW_TRACKING_URI): a new run
                pass
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id + "\n")
        # MLflow params cannot change once logged: a resumed run keeps those of its first start and adds new
        # keys only (the artifact config.yaml is the config of the latest start)
        params = {mlflow_key(k): v if isinstance(v, str) else json.dumps(v) for k, v in _flat(_plain(config)).items()}
        new = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self.client.log_text(self.run_id, config_yaml(config), "config.yaml")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(mlflow_key(k), float(v), now, step) for k, v in scalars(metrics).items()]
        for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """``trackio.init`` / ``run.log(..., step=)`` / ``run.finish()``, local (no network) unless Trackio's own
    ``TRACKIO_SPACE_ID`` or ``TRACKIO_SERVER_URL`` is set; project from ``TRACKIO_PROJECT`` (default
    ``postrl``); Trackio keeps all runs of a project in one database under ``TRACKIO_DIR``."""

    name, package = "trackio", "trackio"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "postrl"), name=run_name,
                                config=_plain(config), resume="never" if resume_step is None else "allow")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {cls.name: cls for cls in
                             (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}
"""name -> class: the valid names of ``run.report_to``."""


def check_trackers(names: list[str]) -> None:
    """Raise :class:`ConfigError` for an unknown tracker name or one whose library is not installed; run it
    before anything is written."""
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"run.report_to: unknown tracker {name!r}{hint}; valid: {', '.join(TRACKERS)}")
        package = TRACKERS[name].package
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ConfigError(f"run.report_to: {name} needs the {package} package: pip install 'postrl[{name}]' "
                              f"({exc})") from exc


def build_trackers(names: list[str], run_dir: Path, run_name: str, config: dict[str, Any],
                   resume_step: int | None = None) -> list[Tracker]:
    """Start one tracker per name, in order. ``resume_step``: the step of the checkpoint a resumed run starts
    from (rows of later steps were cut from metrics.jsonl and will be logged again); None for a new run.
    If one fails to start, those already started are closed and the error is raised."""
    check_trackers(names)
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(TRACKERS[name](Path(run_dir), run_name, config, resume_step))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
