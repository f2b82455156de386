"""A finished trial's trained weights, kept as an Optuna artifact: export needs no retraining.

The interventions' state dict (and the classification head's, if the task has one) is
uploaded to a ``FileSystemArtifactStore`` when a trial completes; the trial records the
artifact id as its ``weights_artifact`` user attribute (a short string, cheap for
dashboards). Where the store lives is decided once per study by ``weights_dir`` and recorded
on the study, so every worker and every later command finds the same folder: next to a
SQLite study file (``sst2.db`` -> ``sst2.artifacts/``), else next to the study YAML.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from torch import nn

from reftsearch.methods.adapter import Adapter
from reftsearch.search.record import TrialRecord, store
from reftsearch.search.storage import sqlite_path
from reftsearch.spec.study_file import StudySpec

WEIGHTS_DIR = "weights_dir"  # study user attribute: where the artifact store is


def weights_dir(spec: StudySpec, storage_url: str) -> Path:
    """The artifact folder for a study stored at ``storage_url``."""
    database = sqlite_path(storage_url)
    if database is not None:
        return database.resolve().with_suffix(".artifacts")
    home = spec.source.resolve().parent if spec.source is not None else Path.cwd()
    return home / f"{spec.name}.artifacts"


def keep(trial: optuna.Trial, adapter: Adapter, head: nn.Module | None) -> None:
    """Upload ``trial``'s trained weights, if the study says where they go."""
    folder = trial.study.user_attrs.get(WEIGHTS_DIR)
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {
        "reft": _cpu(adapter.state_dict()),  # the key of every kept file: ReFT or LoRA
        "head": None if head is None else _cpu(head.state_dict()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trial-{trial.number}-weights.pt"
        torch.save(state, path)
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=FileSystemArtifactStore(folder),
            file_path=str(path),
            study_or_trial=trial,
        )
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
    folder, artifact_id = study.user_attrs.get(WEIGHTS_DIR), TrialRecord.of(trial).weights_artifact
    if folder is None or artifact_id is None:
        return None
    try:
        with FileSystemArtifactStore(folder).open_reader(artifact_id) as reader:
            state = torch.load(io.BytesIO(reader.read()), weights_only=True)
    except (ArtifactNotFound, FileNotFoundError):
        return None
    adapter.load_state_dict(state["reft"])
    if head is not None:
        head.load_state_dict(state["head"])
    return f"{folder}/{artifact_id}"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").clone() for name, tensor in state.items()}
