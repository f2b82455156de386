"""A trained trial -> a directory that AdapterHub ``adapters`` (1.3.0) ``model.load_adapter`` reads.

``OUT_DIR`` holds what ``model.save_adapter`` writes for a ReFT adapter named ``reftsearch``:

* ``adapter_config.json``: a ``LoReftConfig`` / ``NoReftConfig`` / ``DiReftConfig`` as a dict;
* ``pytorch_adapter.bin``: the units' weights under the model's parameter names;
* ``head_config.json`` + ``pytorch_model_head.bin``: a trained classification head, as
  ``save_adapter(with_head=True)`` writes a model's own (static) head, for a base model that is
  a path (a built-in base model's ``base_model/`` holds its trained head already);

plus ``base_model/`` (built-in base models, written as the pyreft export writes it),
``reference_io.json`` (inputs and reftsearch's logits, as the pyreft export's) and
``reftsearch.json`` (scores, study, config, how to load). Use::

    model = AutoModelFor...(OUT_DIR/base_model); adapters.init(model)
    model.load_adapter(OUT_DIR, set_active=True)

The two libraries' ReFT agree on the math (``adapters``' ``ReftUnit``: ``x + (W x + b - P x)
P`` with ``P = R^T``) and on where (the output of each block). Where they differ the export
maps exactly or refuses (``why_not_mappable``):

* positions: ``adapters`` edits the first ``p`` and last ``s`` tokens of every forward's input
  (by its attention mask), without pyreft's ``n // 2`` cap: the same tokens only on inputs of
  at least ``2 * max(p, s)`` tokens, so a study whose prompts include shorter ones is refused.
* generation: reftsearch edits the prompt pass only, and decoding reads the edited prompt
  through the key/value cache. ``adapters`` edits the tokens of every forward's own input, and
  its Llama attention (1.3.0 on transformers 4.57) takes ``past_key_value`` where transformers
  passes ``past_key_values``, so cached decoding ignores the cache, with or without an adapter
  (measured). Without the cache every step reruns the whole sequence: its first ``p`` tokens
  are the prompt's, its last ``s`` are not. So prefix-only generation studies export
  (``generate(..., use_cache=False)`` decodes as reftsearch does, see ``GENERATION``), and
  generation studies with a suffix are refused.
* tied: ``adapters``' ``tied_weights`` is reftsearch's ``tied`` (one unit for prefix and
  suffix); its untied builds two units even when one side is empty, so one-sided configs are
  written tied (one unit over the one side: the same thing).
* DiReFT (``h + (W h + b) P``): ``adapters`` 1.3.0 does not save ``subtract_projection`` (a
  class attribute of ``DiReftConfig``, not a dataclass field), so every saved DiReFT, its own
  included, reloads with the projection subtracted, as NoReFT. The export writes DiReFT as the
  NoReFT it then loads, ``h + (W' h + b - P h) P`` with ``W' = W + P``: the same function.
* 16-bit base models: ``ReftUnit`` does not cast the hidden states to its own dtype (float32
  units on a bfloat16 model fail; bfloat16 units compute differently): the export is float32,
  a 16-bit study's trial retrained in float32 (as pyreft's export does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reftsearch.errors import BadInputError
from reftsearch.export.base_model import transformers4_config
from reftsearch.export.out_dir import SIDECAR, listing, replacing
from reftsearch.export.pyreft import (
    BASE_MODEL_DIR,
    REFERENCE_EXAMPLES,
    held_out_score,
    open_pick,
    reference_io,
    trial_sidecar,
    write_base_model,
    write_export_json,
)
from reftsearch.methods.adapter import adapter_config
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.interventions import DiReFT, Intervention, LoReFT
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import EXACT_DTYPE, BaseModel
from reftsearch.models.builtin import BUILTIN_MODELS
from reftsearch.progress import Log
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import PreparedStudy, prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.spec.study_file import StudySpec

ADAPTERS_VERSION = "1.3.0"
ADAPTER_NAME = "reftsearch"  # the name load_adapter gives it (adapter_config.json's "name")
CONFIG_FILE = "adapter_config.json"  # adapters.utils.CONFIG_NAME
WEIGHTS_FILE = "pytorch_adapter.bin"  # adapters.utils.WEIGHTS_NAME
HEAD_CONFIG_FILE = "head_config.json"  # adapters.utils.HEAD_CONFIG_NAME
HEAD_WEIGHTS_FILE = "pytorch_model_head.bin"  # adapters.utils.HEAD_WEIGHTS_NAME
GENERATION = (
    "generate with model.generate(..., use_cache=False): adapters 1.3.0 edits the first tokens "
    "of every forward's own input (with a cache, each new token), and its Llama attention "
    "ignores the key/value cache on transformers 4.57"
)


# reftsearch intervention -> the adapters 1.3.0 config class written (see DiReFT above)
ADAPTERS_CLASSES = {"loreft": "LoReftConfig", "noreft": "NoReftConfig", "direft": "NoReftConfig"}


@dataclass(frozen=True)
class AdaptersExport:
    out_dir: Path
    trial: int
    weights: str  # where the trained weights came from
    note: str | None  # what a user of the export must know (generation), or None
    test_score: float | None


def export_study(
    spec: StudySpec,
    storage_url: str,
    out_dir: str | Path,
    trial_number: int | None = None,
    log: Log = print,
) -> AdaptersExport:
    """Write the best trial (or ``trial_number``) of the stored study to ``out_dir``."""
    out, study, trial = open_pick(spec, storage_url, out_dir, trial_number, log)
    recorded = TrialRecord.of(trial).config or {}
    if "intervention" not in recorded:
        raise BadInputError(
            f"trial {trial.number}: only ReFT trials export to adapters' ReftConfig; its config "
            f"has no intervention: {recorded}"
        )
    config = adapter_config(recorded)
    prepared = prepare(spec, dtype=EXACT_DTYPE)  # see the module's text
    why = why_not_mappable(config, prepared)
    if why is not None:  # before anything is trained or written
        raise BadInputError(f"trial {trial.number} cannot be exported to adapters: {why}")
    base = prepared.base
    base_config = transformers4_config(base.model.config.to_dict(), "the base model's config")
    reft, weights = trained_adapter(prepared, study, trial, log)
    score = held_out_score(spec, study, trial, log, trained=(prepared, reft))

    # every built-in is copied: base_model/ then holds the trained head (see why_not_mappable)
    copy = spec.model.path in BUILTIN_MODELS
    with replacing(out, log) as scratch:
        write_export_json(
            scratch / CONFIG_FILE, adapter_config_file(config, base), indent=2, sort_keys=True
        )
        state = adapter_state_dict(reft, base)
        torch.save(state, scratch / WEIGHTS_FILE)
        location = write_base_model(
            scratch, spec.model.path, spec.model.path, base, base_config, copy
        )
        head = None if base.head is None or copy else write_static_head(scratch, base)
        reference = reference_io(base, reft, prepared.split.dev[:REFERENCE_EXAMPLES], list(state))
        reference["model"] = str(out / BASE_MODEL_DIR) if copy else location["load_from"]
        write_export_json(scratch / "reference_io.json", reference)

        note = GENERATION if spec.task.kind == "generation" else None
        sidecar = {
            **trial_sidecar(spec, storage_url, trial, prepared, score, weights),
            "base_model": {
                **location,
                "copied": copy,
                "dtype": base.dtype,
                "class": type(base.model).__name__,
                "hidden_size": base.hidden_size,
            },
            "adapters": {
                "version": ADAPTERS_VERSION,
                "config_class": ADAPTERS_CLASSES[config.intervention],
                "adapter_name": ADAPTER_NAME,
                "head_files": head,
                "load": "adapters.init(model); model.load_adapter(OUT_DIR, set_active=True)",
            },
            "note": note,
        }
        sidecar |= listing(scratch)  # what a later export may replace
        write_export_json(scratch / SIDECAR, sidecar)
    return AdaptersExport(out, trial.number, weights, note, score)


def why_not_mappable(config: ReftConfig, prepared: PreparedStudy) -> str | None:
    """Why ``adapters`` 1.3.0 cannot compute what this trial computed, or None if it can."""
    if prepared.spec.task.kind == "generation" and config.suffix > 0:
        return (
            f"a generation study with a suffix ({config.positions}): reftsearch edits the "
            "prompt's last tokens once and decodes from their cached keys and values; adapters "
            "1.3.0 edits the last tokens of every forward's input (the generated ones) and its "
            "Llama attention ignores the key/value cache, so it cannot decode the same way "
            "(prefix-only generation studies export)"
        )
    widest = max(config.prefix, config.suffix)
    lengths = [e.prompt_length for e in (*prepared.split.train, *prepared.split.dev)]
    short = [n for n in lengths if n < 2 * widest]
    if short:
        return (
            f"{len(short)} of the study's {len(lengths)} train/dev prompts have fewer than "
            f"2 * max(prefix, suffix) = {2 * widest} tokens (the shortest {min(short)}): "
            f"reftsearch edits at most n // 2 tokens per side of such a prompt (pyreft's cap), "
            f"adapters edits {config.positions} uncapped, so those prompts would compute "
            "differently"
        )
    base = prepared.base
    in_base_model_dir = prepared.spec.model.path in BUILTIN_MODELS  # see write_base_model
    if base.head is not None and not in_base_model_dir and _head_has_base_parameters(base):
        return (
            f"the trained classification head includes parameters under "
            f"{base.model.base_model_prefix!r} (e.g. a pooler), and adapters' load_adapter "
            "loads only a static head's parameters outside the base model; export from a "
            "built-in base model (its base_model/ holds the whole trained head) or use the "
            "pyreft format"
        )
    return None


def adapter_config_file(config: ReftConfig, base: BaseModel) -> dict:
    """``adapter_config.json`` as ``save_adapter`` writes it (``build_full_config``)."""
    reft_config = {
        "architecture": "reft",
        "layers": list(config.layers),
        "prefix_positions": config.prefix,
        "suffix_positions": config.suffix,
        "r": config.rank,
        "orthogonality": config.intervention == "loreft",
        # one unit: reftsearch's tied, or one side only (adapters' untied would add an unused
        # unit for the empty side)
        "tied_weights": config.groups == 1,
        "dropout": config.dropout,
        "non_linearity": None,  # reftsearch's interventions are linear
        "dtype": None,  # float32, the dtype of the model's default parameters
        "output_reft": True,
        "init_weights_seed": None,
    }
    model_config = base.model.config
    return {
        "config": reft_config,
        "hidden_size": base.hidden_size,
        "model_class": type(base.model).__name__,
        "model_name": "",
        "model_type": model_config.model_type,
        "name": ADAPTER_NAME,
        "version": f"adapters.{ADAPTERS_VERSION}",
    }


def adapter_state_dict(reft: ReftModule, base: BaseModel) -> dict[str, torch.Tensor]:
    """The units' tensors under the names ``save_adapter`` gives them:
    ``<block>.reft_layer.refts.<name>.units.<group>.<tensor>`` (``adapters.methods.reft``)."""
    c = reft.config
    names = {id(module): name for name, module in base.model.named_modules()}
    state = {}
    for layer in c.layers:
        block = names[id(base.blocks[layer])]
        for group in range(c.groups):  # unit 0: the first tokens (or all), unit 1: the last
            prefix = f"{block}.reft_layer.refts.{ADAPTER_NAME}.units.{group}."
            for name, tensor in unit_tensors(reft.intervention(layer, group)).items():
                state[prefix + name] = tensor.detach().float().cpu().contiguous()
    return state


def unit_tensors(intervention: Intervention) -> dict[str, torch.Tensor]:
    """One intervention as an ``adapters`` ``ReftUnit``'s state dict.

    ``ReftUnit.projection`` is ``Linear(hidden, rank)``: its weight ``[rank, hidden]`` is
    reftsearch's ``R^T`` (LoReFT) or ``proj_layer.weight`` (NoReFT, DiReFT; DiReFT's
    ``learned_source.weight`` gets it added, as the NoReFT adapters loads). For LoReFT both
    hold torch's orthogonal parametrization; a wide weight is parametrized through its
    transpose, so adapters' ``original`` is reftsearch's transposed and the ``base`` is the
    same: R is rebuilt from the trained parameters, not from a copy of its value.
    """
    tensors = {
        "learned_source.weight": intervention.learned_source.weight,
        "learned_source.bias": intervention.learned_source.bias,
    }
    if isinstance(intervention, LoReFT):
        orthogonal = intervention.rotate_layer.parametrizations.weight
        tensors["projection.parametrizations.weight.original"] = orthogonal.original.T
        tensors["projection.parametrizations.weight.0.base"] = orthogonal[0].base
    else:
        tensors["projection.weight"] = intervention.proj_layer.weight
    if isinstance(intervention, DiReFT):  # W h + b = (W + P) h + b - P h
        tensors["learned_source.weight"] = (
            intervention.learned_source.weight + intervention.proj_layer.weight
        )
    return tensors


def write_static_head(out: Path, base: BaseModel) -> list[str]:
    """The trained head as ``save_adapter(with_head=True)`` writes a static (HF) head: the
    model's parameters outside its base model, and the class that must load them."""
    head = {id(p) for p in base.head.parameters()}
    state = {
        name: p.detach().float().cpu().contiguous()
        for name, p in base.model.named_parameters()
        if id(p) in head
    }
    config = base.model.config
    write_export_json(
        out / HEAD_CONFIG_FILE,
        {
            "config": None,
            "hidden_size": base.hidden_size,
            "label2id": config.label2id,
            "model_class": type(base.model).__name__,
            "model_name": "",
            "model_type": config.model_type,
            "name": None,
            "num_labels": config.num_labels,
            "version": f"adapters.{ADAPTERS_VERSION}",
        },
        indent=2,
        sort_keys=True,
    )
    torch.save(state, out / HEAD_WEIGHTS_FILE)
    return [HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE]


def _head_has_base_parameters(base: BaseModel) -> bool:
    head = {id(p) for p in base.head.parameters()}
    base_prefix = base.model.base_model_prefix + "."
    return any(
        name.startswith(base_prefix) for name, p in base.model.named_parameters() if id(p) in head
    )
