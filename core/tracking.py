"""Live tracking of a run's numbers: one interface over TensorBoard, Weights & Biases and MLflow.

``make_tracker(name, folder, ...)`` returns a :class:`Tracker`; training and evaluation call only
``start(first_step)``, ``log(scalars, step)`` and ``close()``, whatever the backend:

- ``tensorboard`` (the default): event files in ``FOLDER/tb`` (``torch.utils.tensorboard``);
  ``start(first_step)`` opens a writer with ``purge_step=first_step``, so points at or after that
  step left by an earlier, interrupted process are hidden by every TensorBoard reader;
- ``wandb`` (``pip install wandb``): one W&B run per folder, its id kept in ``FOLDER/wandb_run_id``
  so a resumed run continues it; ``WANDB_MODE=offline`` works without a server (``wandb sync`` later);
- ``mlflow`` (``pip install mlflow`` or ``mlflow-skinny``): one MLflow run per folder, its id kept
  in ``FOLDER/mlflow_run_id``; the store is ``$MLFLOW_TRACKING_URI``, else a local one in the folder
  (:func:`mlflow_store`; no server: ``mlflow ui --backend-store-uri sqlite:///FOLDER/mlflow.db``);
- ``none``: nothing.

A missing optional package is a ``UserError`` raised by :func:`make_tracker`, before anything runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from errors import UserError

from .files import atomic_write_text

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
DEFAULT_TRACKER = "tensorboard"
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow-skinny")}  # tracker -> (module, what to pip install)


class Tracker:
    """Receives scalars by step; this base class drops them (``--tracker none``)."""

    name = "none"

    def __init__(self, folder: Path, *, run_name: str, config: Optional[Mapping[str, Any]] = None,
                 job: str = "train") -> None:
        self.folder, self.run_name, self.job = Path(folder), run_name, job
        self.config = dict(config or {})

    def start(self, first_step: int) -> None:
        """Open the tracker; ``first_step`` is the first step this process logs. Steps below it were
        logged by earlier processes of the same run (a resume); anything they logged at or after it
        is replaced, where the backend allows it (TensorBoard does)."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record ``scalars`` (tag -> number) at ``step``."""

    def close(self) -> None:
        """Flush and close; safe to call twice or without :meth:`start`."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Event files under ``FOLDER/tb``, flushed after every :meth:`log` (read live by ``tensorboard --logdir``)."""

    name = "tensorboard"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writer = None

    def start(self, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.folder / "tb"), purge_step=first_step)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    """A Weights & Biases run in ``FOLDER/wandb``; a resumed run continues the same W&B run."""

    name = "wandb"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run = None

    def start(self, first_step: int) -> None:
        import wandb

        run_id = _run_id(self.folder / "wandb_run_id", first_step)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gkl-at"), name=self.run_name, id=run_id,
                                  resume="allow", dir=str(self.folder), config=self.config, job_type=self.job)
        except Exception as e:  # wandb raises its own types (no login, no network)
            raise UserError(f"--tracker wandb could not start: {str(e).splitlines()[0][:200]}; run `wandb login`, "
                            "or set WANDB_MODE=offline (sync later with `wandb sync`), or choose another --tracker"
                            ) from None

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)  # W&B ignores steps below the run's current one

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowTracker(Tracker):
    """An MLflow run (``MlflowClient``) in ``$MLFLOW_TRACKING_URI``, else in the file store ``FOLDER/mlruns``."""

    name = "mlflow"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.client, self.run_id = None, None

    def start(self, first_step: int) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_store(self.folder))
        id_file = self.folder / "mlflow_run_id"
        saved = id_file.read_text().strip() if first_step > 1 and id_file.is_file() else None
        if saved:
            self.run_id = saved
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gkl-at")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags={"job": self.job})
        self.run_id = run.info.run_id
        for key, value in self.config.items():
            self.client.log_param(self.run_id, key, str(value)[:500])
        atomic_write_text(id_file, self.run_id + "\n")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key=tag, value=float(v), timestamp=now, step=step) for tag, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
        self.client = None


def mlflow_store(folder: Path) -> str:
    """``$MLFLOW_TRACKING_URI``; else the SQLite store ``FOLDER/mlflow.db`` where SQLAlchemy is installed (the full
    ``mlflow`` package), else the file store ``FOLDER/mlruns`` (``mlflow-skinny``; MLflow 3 asks for an opt-in)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if importlib.util.find_spec("sqlalchemy") is not None:
        return f"sqlite:///{(folder / 'mlflow.db').absolute()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (folder / "mlruns").absolute().as_uri()


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker, "none": Tracker}


def _run_id(path: Path, first_step: int) -> str:
    """The run id saved in ``path`` when continuing a run (``first_step > 1``), else a new one, saved."""
    if first_step > 1 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B run ids: lower-case letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


def require(name: str, flag: str = "--tracker") -> None:
    """``UserError`` unless ``name`` is a tracker whose package imports (one line naming the install)."""
    if name not in _CLASSES:
        raise UserError(f"{flag} {name!r} is not one of: {', '.join(TRACKERS)}")
    if name in _PACKAGES:
        module, package = _PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{flag} {name} needs the optional package {package}: pip install {package} "
                            f"(or choose another {flag}: {', '.join(TRACKERS)})") from None


def make_tracker(name: str, folder: str | os.PathLike, *, run_name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, job: str = "train") -> Tracker:
    """The tracker ``name`` (one of :data:`TRACKERS`) for the run folder ``folder``; writes nothing yet."""
    require(name)
    folder = Path(folder)
    return _CLASSES[name](folder, run_name=run_name or folder.absolute().name, config=config, job=job)
