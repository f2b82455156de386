"""The base model of an export, as an older transformers reads it: copied, or referenced.

pyreft 0.1.0 pins transformers 4.45.1, which reads config.json in its own schema. transformers
5 renamed fields: ``rope_parameters`` holds what 4.45 reads as ``rope_theta``,
``rope_scaling`` (and ``partial_rotary_factor``), and ``dtype`` was ``torch_dtype``. A key 4.45
does not know is ignored without a word, so a SmolLM2 config saved by transformers 5 runs
there with rope_theta 10000 instead of 100000 (logits off by 1.5-2.4). ``transformers4_config``
writes every renamed field under its old name too; what the old schema cannot say is refused.

Compared field by field (``LlamaConfig()`` and ``BertConfig()`` ``to_dict()`` in both
versions): the keys only 4.45 has are those above, generation defaults (``max_length``,
``top_k``, ...: the generation config's since transformers 4.41, not the forward pass's), and
fields transformers 5 dropped with their feature (``pruned_heads``, ``use_bfloat16``,
``torchscript``, and two that change 4.45's forward pass: BERT's ``position_embedding_type``,
of which 5 computes only ``absolute``, and Llama's ``pretraining_tp``, whose sliced matmuls 5
no longer does). Those two are written as what transformers 5 computes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import transformers

from reftsearch.errors import BadInputError

# transformers 4.45.1's ROPE_INIT_FUNCTIONS
TRANSFORMERS4_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# rope_parameters entries that transformers 4.45 reads as top-level config fields
TOP_LEVEL_ROPE_FIELDS = ("rope_theta", "partial_rotary_factor")
# fields transformers 5 still writes but no longer reads, and what its forward pass does instead
IGNORED_BY_TRANSFORMERS5 = {"position_embedding_type": "absolute", "pretraining_tp": 1}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# transformers 5's generic fast tokenizer class, unknown to 4.45; its files are
# PreTrainedTokenizerFast's
TOKENIZERS_BACKEND = "TokenizersBackend"


def transformers4_config(config: dict, where: str = "config") -> dict:
    """``config`` (a ``to_dict()``) with every field transformers 5 renamed also written under
    the name transformers 4.45 reads, so that both versions build the same model.

    Raises BadInputError naming the field when 4.45 cannot express it."""
    legacy = dict(config)
    legacy.update({k: v for k, v in IGNORED_BY_TRANSFORMERS5.items() if k in legacy})
    if "dtype" in legacy:
        legacy["torch_dtype"] = legacy["dtype"]
    if legacy.get("rope_parameters") is not None:
        legacy.update(_transformers4_rope(legacy["rope_parameters"], f"{where}.rope_parameters"))
    for key, value in config.items():  # multimodal configs nest their text model's
        if isinstance(value, dict) and "model_type" in value:
            legacy[key] = transformers4_config(value, f"{where}.{key}")
    return legacy


def _transformers4_rope(rope: dict, where: str) -> dict:
    if any(isinstance(value, dict) for value in rope.values()):
        raise BadInputError(
            f"{where}: one rope setting per layer type ({sorted(rope)}) cannot be written for "
            "transformers 4.45 (pyreft's), which has one per model"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in TRANSFORMERS4_ROPE_TYPES:
        raise BadInputError(
            f"{where}.rope_type: transformers 4.45 (pyreft's) knows no {rope_type!r} rope; "
            f"it knows {list(TRANSFORMERS4_ROPE_TYPES)}"
        )
    fields = {name: rope[name] for name in TOP_LEVEL_ROPE_FIELDS if name in rope}
    scaling = {k: v for k, v in rope.items() if k not in TOP_LEVEL_ROPE_FIELDS}
    fields["rope_scaling"] = None if rope_type == "default" else {**scaling, "type": rope_type}
    return fields


def save_base_model_for_transformers4(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    directory: Path,
) -> None:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``directory``, readable alike by
    transformers 5 and by 4.45 (pyreft 0.1.0's): renamed config fields under both names, and
    the tokenizer under a class 4.45 knows."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_json(directory / "config.json", transformers4_config(model.config.to_dict()))
    tokenizer_config = directory / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    if settings.get("tokenizer_class") == TOKENIZERS_BACKEND:
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(tokenizer_config, settings)


def base_model_reference(path: str, model: transformers.PreTrainedModel) -> dict:
    """Where the export's base model is when it is not copied: the hub id (with the revision
    it was loaded at) or the directory, the sha256 of each weight file, and the tokenizer
    class transformers 4.45 loads it with."""
    directory = Path(path).expanduser()
    revision = getattr(model.config, "_commit_hash", None)
    if directory.is_dir():
        directory, revision = directory.resolve(), None
    else:  # a hub id: its files are in the local hub cache, at the revision loaded
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(path, revision=revision, local_files_only=True))
    return {
        "load_from": str(directory) if revision is None else path,
        "revision": revision,
        "sha256": weight_checksums(directory),
        "tokenizer_class": tokenizer_class(directory),
    }


def weight_checksums(directory: Path) -> dict[str, str]:
    """sha256 of each weight file in ``directory`` (top level, as from_pretrained reads)."""
    checksums = {}
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES):
            digest = hashlib.sha256()
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            checksums[file.name] = digest.hexdigest()
    return checksums


def tokenizer_class(directory: Path) -> str:
    """The transformers class that loads ``directory``'s tokenizer in transformers 4.45."""
    settings = directory / "tokenizer_config.json"
    if settings.is_file() and json.loads(settings.read_text()).get("tokenizer_class") == (
        TOKENIZERS_BACKEND
    ):
        return "PreTrainedTokenizerFast"
    return "AutoTokenizer"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
