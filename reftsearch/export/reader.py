"""A pyreft export directory read back into reftsearch: the trial's model, interventions and
task settings, with no study storage (``reftsearch predict EXPORT_DIR``).

``reftsearch.json`` says how the trial was trained: its config (intervention, layers,
positions, rank), its task settings (``task_spec``: columns, ``max_length``,
``max_new_tokens``), its classes and where the base model is. The base model is loaded from
``base_model/`` when the export copied it, else from the directory or hub id it names, whose
weight files must still have the sha256 recorded at export; in the dtype the trial trained in.
The interventions come from pyreft's own files (``intkey_<key>.bin``, in ``config.json``'s
key order), the classification head from ``pytorch_model.bin`` (pyvene's name for it).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from reftsearch.errors import BadInputError
from reftsearch.export.base_model import weight_checksums
from reftsearch.export.out_dir import SIDECAR
from reftsearch.export.pyreft import (
    BASE_MODEL_DIR,
    TASK_SPEC,
    TASK_SPEC_FIELDS,
    pyreft_order,
)
from reftsearch.methods.adapter import adapter_config
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import BaseModel, load_base_model
from reftsearch.models.builtin import quiet_transformers, shipped_directory
from reftsearch.models.sources import ModelLoadError
from reftsearch.spec.study_file import DataSpec, TaskSpec

PYREFT_CONFIG = "config.json"


@dataclass(frozen=True)
class PyreftExport:
    """An export directory whose ``reftsearch.json`` has been read and checked (cheap: no
    weights are loaded until ``load``)."""

    directory: Path
    sidecar: dict
    task: TaskSpec
    label_names: list[str] | None

    @property
    def description(self) -> str:
        s = self.sidecar
        return f"trial {s['trial']} of study {s['study']!r}, exported to {self.directory}"

    def load(self, device: str = "auto") -> tuple[BaseModel, ReftModule]:
        """The base model (trained head loaded) and the trained interventions, on ``device``."""
        base = self._base_model(device)
        head_file = self.sidecar["pyreft"]["head_file"]
        if head_file is not None:
            load_head(base, head_file, self._torch_file(head_file))
        return base, self._interventions(base)

    def _base_model(self, device: str) -> BaseModel:
        entry = self.sidecar["base_model"]
        directory = base_model_directory(self.directory, entry)
        head = "classification" if self.task.kind == "classification" else "causal_lm"
        try:
            with quiet_transformers():  # no report of a new head: the export's is loaded next
                base = load_base_model(
                    str(directory),
                    head,
                    num_labels=max(len(self.label_names or ()), 2),
                    dtype=entry["dtype"],
                    device=device,
                )
        except ModelLoadError as err:
            raise BadInputError(f"{self.directory}: its base model: {err}") from None
        if self.label_names:
            base.model.config.id2label = dict(enumerate(self.label_names))
            base.model.config.label2id = {name: i for i, name in enumerate(self.label_names)}
        return base

    def _interventions(self, base: BaseModel) -> ReftModule:
        config = adapter_config(self.sidecar["config"])
        assert isinstance(config, ReftConfig)  # open_export refuses anything else
        reft = ReftModule(config, base.hidden_size)
        modules = pyreft_order(reft)
        keys = read_json(self.directory / PYREFT_CONFIG).get("sorted_keys", [])
        if len(keys) != len(modules):
            raise BadInputError(
                f"{self.directory / PYREFT_CONFIG}: holds {len(keys)} interventions, the "
                f"trial's config in {SIDECAR} makes {len(modules)}"
            )
        for key, module in zip(keys, modules, strict=True):
            module.load_pyreft_state_dict(self._torch_file(f"intkey_{key}.bin"))
        return reft.to(base.device).eval()

    def _torch_file(self, name: str) -> dict[str, torch.Tensor]:
        path = self.directory / name
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise BadInputError(f"{path}: cannot be read as the export wrote it ({err})") from None


def open_export(directory: Path) -> PyreftExport:
    """``directory`` as a pyreft export ``predict`` can run, refused (BadInputError, saying
    what to do) when it is not a reftsearch export, is one for AdapterHub adapters, or was
    written by a reftsearch that did not record the task settings yet."""
    path = directory / SIDECAR
    if not path.is_file():
        raise BadInputError(
            f"{directory}: not a reftsearch export (it has no {SIDECAR}); give a study file "
            "or a directory `reftsearch export` wrote"
        )
    sidecar = read_json(path)
    if "adapters" in sidecar:
        raise BadInputError(
            f"{directory}: an export for AdapterHub adapters (--format adapters); predict reads "
            "pyreft exports: export the trial again without --format adapters"
        )
    if TASK_SPEC not in sidecar:
        raise BadInputError(
            f"{directory}: written by reftsearch {sidecar.get('reftsearch_version', '(unknown)')}"
            f", whose {SIDECAR} lacks the task settings ({TASK_SPEC}) predict encodes inputs "
            "with; export the trial again with this reftsearch (reftsearch export STUDY OUT_DIR "
            "--trial N)"
        )
    config = sidecar.get("config") or {}
    if "intervention" not in config:
        method = config.get("method", "unknown") if isinstance(config, dict) else "unknown"
        raise BadInputError(
            f"{directory}: an export of a {method} trial; predict EXPORT_DIR runs ReFT "
            "exports: run the trial from its study instead (reftsearch predict STUDY --trial N)"
        )
    try:
        settings = sidecar[TASK_SPEC]
        read = settings["data"]
        columns = None if read["columns"] is None else tuple(read["columns"])
        data = DataSpec(header=read["header"], columns=columns, read_options=read["read_options"])
        task = TaskSpec(**{name: settings[name] for name in TASK_SPEC_FIELDS}, data=data)
    except (KeyError, TypeError) as err:  # a reftsearch.json edited by hand
        raise _edited(path, TASK_SPEC, f"{type(err).__name__}: {err}") from None
    for name in ("max_length", "max_new_tokens"):
        value = getattr(task, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _edited(path, f"{TASK_SPEC}.{name}", f"a positive integer, got {value!r}")
    if (
        not isinstance(sidecar.get("base_model"), dict)
        or BASE_MODEL_KEYS - sidecar["base_model"].keys()
    ):
        raise _edited(path, "base_model", f"an object with {sorted(BASE_MODEL_KEYS)}")
    return PyreftExport(directory, sidecar, task, _label_names(path, sidecar, task))


# what export records of the base model (reftsearch.export.pyreft), all of which load reads
BASE_MODEL_KEYS = frozenset({"copied", "revision", "load_from", "path", "sha256", "dtype"})


def _label_names(path: Path, sidecar: dict, task: TaskSpec) -> list[str] | None:
    """The classes in ``id2label`` (``{"0": name, ...}``), which the head's rows follow."""
    id2label = sidecar.get("id2label") or {}
    if task.kind != "classification":
        return None
    ids = [str(i) for i in range(len(id2label))] if isinstance(id2label, dict) else []
    if len(ids) < 2 or sorted(id2label, key=str) != sorted(ids):  # a dict of "0".."n-1"
        raise _edited(
            path, "id2label", f'the classes by id, {{"0": ..., "1": ...}}, got {id2label!r}'
        )
    return [str(id2label[i]) for i in ids]


def _edited(path: Path, key: str, wanted: str) -> BadInputError:
    """A ``reftsearch.json`` edited by hand: which key, and what export writes there."""
    return BadInputError(
        f"{path}: {key} is not as export writes it ({wanted}); export the trial again "
        "(reftsearch export STUDY OUT_DIR --trial N)"
    )


def read_json(path: Path) -> dict:
    """The JSON object in an export's file ``path``."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def base_model_directory(export_dir: Path, entry: dict) -> Path:
    """Where the export's base model is on this machine: ``base_model/`` when copied, else
    the directory (or hub snapshot) it references, its weights checked against the sha256
    the export recorded."""
    if entry["copied"]:
        return export_dir / BASE_MODEL_DIR
    if entry["revision"] is not None:  # a hub id, at the revision it was trained with
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(entry["load_from"], revision=entry["revision"]))
        except Exception as err:  # offline, gone from the hub: the user must fetch it
            raise BadInputError(
                f"{export_dir}: its base model {entry['load_from']} (revision "
                f"{entry['revision']}) cannot be found: {type(err).__name__}: {err}"
            ) from None
    else:
        directory = Path(entry["load_from"])
        shipped = shipped_directory(entry["path"])
        if not directory.is_dir() and shipped is not None:
            directory = shipped  # a built-in's package, installed elsewhere on this machine
        if not directory.is_dir():
            raise BadInputError(
                f"{export_dir}: its base model directory {directory} does not exist (moved or "
                "deleted); put it back, or export the trial again --with-base-model"
            )
    check_checksums(directory, entry["sha256"] or {})
    return directory


def check_checksums(directory: Path, expected: dict[str, str]) -> None:
    """Refuse a referenced base model whose weight files are not those the trial trained on."""
    found = weight_checksums(directory)
    for name in sorted(expected.keys() | found.keys()):
        if found.get(name) == expected.get(name):
            continue
        if name not in found:
            why = "is gone"
        elif name not in expected:
            why = "was not there at export"
        else:
            why = f"has sha256 {found[name]}, the export recorded {expected[name]}"
        raise BadInputError(
            f"{directory / name}: {why}: not the base model this export was trained on; "
            "restore it, or export the trial again"
        )


def load_head(base: BaseModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """The trained head's parameters (under the model's own names) into ``base``'s model."""
    missing = sorted(state.keys() - dict(base.model.named_parameters()).keys())
    if missing:
        raise BadInputError(
            f"{name}: {', '.join(missing[:3])} not in the base model (another model's head)"
        )
    try:
        base.model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # e.g. a head of 2 classes for a model made for 3
        first = str(err).strip().splitlines()[-1].strip()
        raise BadInputError(
            f"{name}: does not fit the base model as reftsearch.json describes it ({first}); "
            "were its classes (id2label) edited? export the trial again"
        ) from None
