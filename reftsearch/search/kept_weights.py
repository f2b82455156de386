"""A finished trial's trained weights, kept as an Optuna artifact: export needs no retraining.

The interventions' state dict (and the classification head's, if the task has one) is
uploaded to a ``FileSystemArtifactStore`` when a trial completes; the trial records the
artifact id as its ``weights_artifact`` user attribute (a short string, cheap for
dashboards). The store lives next to a SQLite study file (``sst2.db`` -> ``sst2.artifacts/``),
wherever that file is now (a project moved or copied keeps its weights), else in the folder
``weights_dir`` chose when the study was created (next to the study YAML) and recorded on the
study, so every worker and every later command finds it. Weights that cannot be written
(a read-only folder) or read back (a damaged file) are a note, not a failure: export and
predict retrain such a trial's config with its seed.
"""

from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from torch import nn

from reftsearch.methods.adapter import Adapter
from reftsearch.progress import Log
from reftsearch.search.record import TrialRecord, store
from reftsearch.search.storage import NO_ROOM, backend_of, sqlite_path
from reftsearch.spec.study_file import StudySpec

WEIGHTS_DIR = "weights_dir"  # study user attribute: where the artifact store is


def weights_dir(spec: StudySpec, storage_url: str) -> Path:
    """The artifact folder for a study stored at ``storage_url``."""
    database = sqlite_path(storage_url)
    if database is not None:
        return _beside(database)
    home = spec.source.resolve().parent if spec.source is not None else Path.cwd()
    return home / f"{spec.name}.artifacts"


def weights_folder(storage: optuna.storages.BaseStorage, study_id: int) -> Path | None:
    """Where study ``study_id``'s kept weights are: next to its SQLite file as opened now,
    else the folder recorded when it was created; None for a study that keeps none."""
    recorded = storage.get_study_user_attrs(study_id).get(WEIGHTS_DIR)
    if recorded is None:
        return None
    url = getattr(backend_of(storage), "url", None)  # RDB storages have one
    database = sqlite_path(url) if isinstance(url, str) else None
    return _beside(database) if database is not None else Path(recorded)


def _beside(database: Path) -> Path:
    return database.resolve().with_suffix(".artifacts")


def keep(trial: optuna.Trial, adapter: Adapter, head: nn.Module | None, log: Log) -> None:
    """Upload ``trial``'s trained weights, if the study keeps them; if they cannot be written,
    say so and go on (the trial's score stands; export retrains its config)."""
    folder = weights_folder(trial.study._storage, trial.study._study_id)
    if folder is None:
        return
    state = {
        "reft": _cpu(adapter.state_dict()),  # the key of every kept file: ReFT or LoRA
        "head": None if head is None else _cpu(head.state_dict()),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}-weights.pt"
            torch.save(state, path)
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=FileSystemArtifactStore(str(folder)),
                file_path=str(path),
                study_or_trial=trial,
            )
    except OSError as err:
        if err.errno in NO_ROOM:  # the disk is full: the run must stop and say where
            raise OSError(err.errno, err.strerror, str(folder)) from err
        log(f"trial {trial.number}: its weights could not be kept in {folder} ({err.strerror})")
        return
    store(trial, weights_artifact=artifact_id)


def restore(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    adapter: Adapter,
    head: nn.Module | None,
) -> str | None:
    """Load ``trial``'s kept weights into ``adapter`` (and ``head``); None if they are gone.

    Returns where they came from (for the user), or None when there is nothing to load.
    """
    folder = weights_folder(study._storage, study._study_id)
    artifact_id = TrialRecord.of(trial).weights_artifact
    if folder is None or artifact_id is None:
        return None
    try:
        with FileSystemArtifactStore(str(folder)).open_reader(artifact_id) as reader:
            state = torch.load(io.BytesIO(reader.read()), weights_only=True)
        adapter.load_state_dict(state["reft"])
        if head is not None:
            head.load_state_dict(state["head"])
    except (ArtifactNotFound, OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError):
        return None  # gone, unreadable or damaged (torch says so with a RuntimeError)
    return f"{folder}/{artifact_id}"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").clone() for name, tensor in state.items()}
