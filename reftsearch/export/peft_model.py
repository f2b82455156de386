"""A trained LoRA, DoRA or full fine-tuning trial -> a directory its own library loads.

* LoRA and DoRA: what ``peft``'s ``PeftModel.save_pretrained`` writes (``adapter_config.json``,
  ``adapter_model.safetensors``), loaded with ``PeftModel.from_pretrained(base, OUT_DIR)``; a
  classification head trains with every trial, so it is saved with the adapter
  (``modules_to_save``). The base model is named (``base_model_config.json`` and, in
  ``reftsearch.json``, where it is), or copied into ``base_model/`` where it exists nowhere
  else (tiny:*, SmolLM2 from its GGUF file), as the pyreft export does.
* full fine-tuning: a Hugging Face model directory (``save_pretrained`` of the trained model
  and its tokenizer), loaded with ``AutoModelFor...from_pretrained(OUT_DIR)``.

Both add ``reftsearch.json`` (study, trial, scores, config) and replace only a previous
export's files (``out_dir.replacing``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
from torch import nn

from reftsearch.errors import BadInputError
from reftsearch.export.base_model import transformers4_config
from reftsearch.export.out_dir import listing, replacing
from reftsearch.export.pyreft import (
    ExportResult,
    held_out_score,
    open_pick,
    trial_sidecar,
    write_base_model,
    write_export_json,
)
from reftsearch.methods.full.module import FullModule
from reftsearch.methods.lora.module import LoraModule, to_peft
from reftsearch.models.base import BaseModel
from reftsearch.models.builtin import BUILTIN_MODELS, shipped_directory
from reftsearch.progress import Log
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.spec.study_file import StudySpec

METHODS = ("lora", "dora", "full")
# peft (0.21) reads model.is_gradient_checkpointing, which transformers 5 deprecated
DEPRECATED_IN_TRANSFORMERS = "`is_gradient_checkpointing` is deprecated"


def export_study(
    spec: StudySpec,
    storage_url: str,
    out_dir: str | Path,
    trial_number: int | None = None,
    log: Log = print,
) -> ExportResult:
    """Write the best trial (or ``trial_number``) of a LoRA, DoRA or full study to ``out_dir``."""
    out, study, trial = open_pick(spec, storage_url, out_dir, trial_number, log)
    method = (TrialRecord.of(trial).config or {}).get("method", "reft")
    if method not in METHODS:
        raise BadInputError(f"trial {trial.number} is a {method} trial, not one of {METHODS}")
    prepared = prepare(spec)
    base = prepared.base
    adapter, weights = trained_adapter(prepared, study, trial, log)
    score = held_out_score(spec, study, trial, log, trained=(prepared, adapter))
    with replacing(out, log) as scratch:
        sidecar = trial_sidecar(spec, storage_url, trial, prepared, score, weights)
        if isinstance(adapter, FullModule):
            save_full_model(scratch, adapter, base)
            sidecar["load_with"] = f"transformers.{type(base.model).__name__}.from_pretrained"
        else:
            peft_model(adapter, base).save_pretrained(scratch)
            shipped = shipped_directory(spec.model.path)
            copied = spec.model.path in BUILTIN_MODELS and shipped is None
            config = transformers4_config(base.model.config.to_dict(), "the base model's config")
            source = str(shipped or spec.model.path)
            sidecar["base_model"] = write_base_model(
                scratch, spec.model.path, source, base, config, copied
            )
            sidecar["load_with"] = "peft.PeftModel.from_pretrained(base_model, OUT_DIR)"
        sidecar |= listing(scratch)  # what a later export may replace
        write_export_json(scratch / "reftsearch.json", sidecar)
    return ExportResult(out, trial.number, weights, True, "", score)


def module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def peft_model(lora: LoraModule, base: BaseModel) -> peft.PeftModel:
    """A ``PeftModel`` on a copy of the base model holding ``lora``'s trained weights (and the
    trained head, as ``modules_to_save``). Its targets are the wrapped layers' full names, so
    that peft wraps exactly those."""
    model = copy.deepcopy(base.model)
    sites = lora.originals()
    targets = dict(zip(sites, module_names(base.model, list(sites.values())), strict=True))
    head = [] if base.head is None else list(_head_parts(base.head))
    config = to_peft(
        lora.config, list(targets.values()), modules_to_save=module_names(base.model, head) or None
    )
    with warnings.catch_warnings():  # not the user's to act on
        warnings.filterwarnings("ignore", DEPRECATED_IN_TRANSFORMERS, FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    for key, name in targets.items():
        layer = wrapped.base_model.model.get_submodule(name)
        parts = lora.adapters[key]
        layer.lora_A.load_state_dict(parts["A"].state_dict())
        layer.lora_B.load_state_dict(parts["B"].state_dict())
        if "magnitude" in parts:
            layer.lora_magnitude_vector.load_state_dict(parts["magnitude"].state_dict())
    return wrapped.eval()


def _head_parts(head: nn.Module) -> list[nn.Module]:
    return list(head) if isinstance(head, nn.ModuleList) else [head]


def save_full_model(out: Path, full: FullModule, base: BaseModel) -> None:
    """The model with the trial's trained weights (and head), as ``save_pretrained`` writes it."""
    with full.attached(base.blocks):
        base.model.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
