"""Loading the frozen base model that every trial's interventions sit on.

``load_base_model(path, head)`` accepts three kinds of ``path``:

* a built-in name (``tiny:llama``, ``tiny:bert``, ``embedded:minilm``, ``embedded:smollm2``),
  resolved through ``BUILTIN_MODELS`` so that tests and offline users never touch the Hugging
  Face hub; models shipped as GGUF are de-quantized once into a cache (``REFTSEARCH_CACHE``,
  default ``~/.cache/reftsearch``) and loaded from there afterwards;
* a local directory holding Hugging Face files (``config.json``, weights, tokenizer);
* anything else, which is passed to ``from_pretrained`` as a hub id.

Every failure is reported as a ``ModelLoadError`` naming the path, never a raw traceback.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import inspect
import os
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reftsearch.models.builtin import BUILTIN_MODELS
from reftsearch.models.packed_linear import can_pack, forget_packed, pack_linears
from reftsearch.models.pretrained import from_pretrained
from reftsearch.models.sources import ModelLoadError, check_builtin_name, local_dir

HEADS = ("classification", "causal_lm")


@dataclass(frozen=True)
class Precision:
    """How a base model computes: ``matmul``, the dtype its frozen weights are stored in and
    its linear layers run in (their outputs too: attention, keys and values, the MLP's
    inside); ``states``, the dtype of the residual stream between them, which interventions
    edit and norms read."""

    matmul: torch.dtype
    states: torch.dtype


# ``model.dtype`` names. ``-mixed`` runs every matmul in 16 bits but keeps the residual
# stream in float32 (as autocast does), so an intervention's small edit is not rounded to
# 8 bits of mantissa when it is added to the stream, as in a bfloat16 one.
DTYPES: dict[str, Precision] = {
    "float32": Precision(torch.float32, torch.float32),
    "bfloat16": Precision(torch.bfloat16, torch.bfloat16),
    "float16": Precision(torch.float16, torch.float16),
    "bfloat16-mixed": Precision(torch.bfloat16, torch.float32),
}
AUTO_DTYPE = "auto"  # bfloat16-mixed where matmuls have bfloat16 math, else float32
# what a study that searched in 16 bits trains its final pick in: seed reruns and export
EXACT_DTYPE = "float32"
# CPU flags (as /proc/cpuinfo names them) of native bfloat16 matmuls
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# Tokenizers without a real limit report ~1e30; anything past this is treated as "no limit".
_ABSURD_MAX_LENGTH = 1_000_000
_DEFAULT_MAX_LENGTH = 2048
# The tiny models are fixed by this seed so that two loads (and two machines) agree.
# Fallback for architectures whose attention modules do not expose ``is_causal``.
_DECODER_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt",
        "falcon", "olmo", "olmo2", "smollm3", "starcoder2", "stablelm", "cohere", "granite",
    }
)  # fmt: skip
# Where the residual-stream blocks live, relative to ``model.base_model``, by family.
_BLOCK_PATHS = (
    "layers",  # Llama, Mistral, Qwen, Gemma, Phi
    "encoder.layer",  # BERT, RoBERTa, ELECTRA, MiniLM
    "h",  # GPT-2, GPT-Neo, GPT-J, Falcon
    "decoder.layers",  # OPT
    "transformer.layer",  # DistilBERT
    "layer",
    "encoder.layers",
)


def kv_argument(forward_owner: nn.Module) -> str:
    """The name a model's forward gives its key/value cache, as argument and as output:
    ``cache`` in recent transformers, ``past_key_values`` before (and deprecated since)."""
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass
class BaseModel:
    """A frozen model in eval mode plus what trials need to know about it."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    blocks: list[nn.Module]
    head: nn.Module | None
    hidden_size: int
    num_layers: int
    is_decoder: bool
    source: str
    dtype: str = "float32"  # the name in ``DTYPES`` it was loaded with

    @property
    def precision(self) -> Precision:
        return DTYPES[self.dtype]

    def reset_head(self, seed: int) -> None:
        """Re-initialise the head from ``seed`` with the model's own init and make it trainable.

        The init runs on a float32 CPU copy so the same seed gives the same head whatever the
        model's device or dtype; the global RNG state is left untouched.
        """
        if self.head is None:
            return
        fresh = copy.deepcopy(self.head).to(device="cpu", dtype=torch.float32)
        # transformers 5 init functions skip tensors flagged as already initialised (loaded from
        # a checkpoint or built by post_init), so the flags must go for the re-init to happen.
        for item in [*fresh.modules(), *fresh.parameters(), *fresh.buffers()]:
            if hasattr(item, "_is_hf_initialized"):
                delattr(item, "_is_hf_initialized")
        # Only the CPU generator is seeded (and restored): torch.manual_seed would also reseed,
        # and leave changed, the CUDA generators that fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.random.default_generator.manual_seed(seed)
            for module in fresh.modules():
                self.model._init_weights(module)
        # load_state_dict copies into the existing tensors, converting to their device and dtype.
        self.head.load_state_dict(fresh.state_dict())
        for param in self.head.parameters():
            param.requires_grad_(True)

    def head_parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else list(self.head.parameters())

    def training_attention(self) -> contextlib.AbstractContextManager:
        """Where a training step's forward runs, so that its attention's backward is fast:
        on a CPU, torch's flash attention computes 16-bit gradients ~3x slower than plain
        (math) attention does (bfloat16, 8 rows of 5 tokens attending to 40: 4.9 vs 1.6 ms,
        float32 flash 0.9), though its 16-bit forward is the faster one."""
        if self.device.type == "cpu" and self.precision.matmul != torch.float32:
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def drop_weights(self) -> None:
        """Free the weights' memory, keeping the structure (on the meta device): enough to
        check a spec against, not to run. A Ray run's driver does so once its workers take
        over; they load their own copies."""
        forget_packed(self.model)
        self.model.to("meta")
        _return_freed_memory()

    @property
    def device(self) -> torch.device:
        """Where inputs and interventions must go; read live so ``model.to(...)`` is followed."""
        return next(self.model.parameters()).device


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps it for the process to reuse: after
    the weights of a bfloat16 checkpoint loaded in float32 (SmolLM2-135M, 515 MB) were freed,
    the process still held 442 MB of them until ``malloc_trim``."""
    gc.collect()  # tensors in reference cycles go now, not at some later collection
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): no trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------- public entry


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device torch sees, else the CPU; ``cpu``, ``cuda``,
    ``cuda:<index>`` as named, once checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA devices (a CPU "
            "build of torch, or CUDA_VISIBLE_DEVICES hides them): use auto or cpu"
        )
    return device


def load_base_model(
    path: str, head: str, num_labels: int = 2, dtype: str = "float32", device: str = "cpu"
) -> BaseModel:
    """Load ``path`` with a ``head`` ("classification" or "causal_lm") onto ``device`` (see
    ``resolve_device``) in ``dtype`` (a name in ``DTYPES``, or ``auto``: see
    ``default_dtype``), frozen and in eval mode.

    The head (if any) is frozen too until ``reset_head`` is called, which every trial does.
    """
    if head not in HEADS:
        raise ModelLoadError(f"{path}: head must be one of {list(HEADS)}, got {head!r}")
    names = [*DTYPES, AUTO_DTYPE]
    if dtype not in names:
        raise ModelLoadError(f"{path}: dtype must be one of {names}, got {dtype!r}")
    if head == "classification" and num_labels < 1:
        raise ModelLoadError(f"{path}: num_labels must be >= 1, got {num_labels}")

    target = resolve_device(device)
    dtype = default_dtype(target) if dtype == AUTO_DTYPE else dtype
    precision = DTYPES[dtype]
    if emulated_on(precision.matmul, target):
        # a pin (tests set one) is not the CPU: say which of the two said so
        pin = os.environ.get(NATIVE_BFLOAT16_CPU_ENV)
        pinned = precision.matmul == torch.bfloat16 and pin == "0"
        why = f"{NATIVE_BFLOAT16_CPU_ENV}=0 says it lacks" if pinned else "it lacks"
        warnings.warn(
            f"{path}: dtype {dtype} is emulated on this CPU ({why} the AVX512-BF16/AMX "
            f"instructions for it): its matmuls run several times slower than in float32 (7x "
            f"on an AVX2 EPYC); use float32 here",
            stacklevel=2,
        )
    model, tokenizer = _load(path, head, num_labels, precision.states)
    base = _finish(path, head, model.to(target), tokenizer, dtype)
    if precision.matmul != precision.states:
        _mix_precision(base)
    if can_pack(target, precision.matmul) and not emulated_on(precision.matmul, target):
        pack_linears(m for m in _frozen_modules(base) if isinstance(m, nn.Linear))
    return base


def default_dtype(device: torch.device, cpu_flags: Collection[str] | None = None) -> str:
    """What ``auto`` loads: ``bfloat16-mixed`` where matmuls have native bfloat16 math (a GPU
    of Ampere or newer; a CPU with AVX512-BF16 or AMX-BF16, ``cpu_flags`` as Linux lists them,
    by default this one's), where it ran 1.5-1.6x faster than float32 (benchmarks/README.md);
    float32 elsewhere, since other CPUs emulate bfloat16 (see ``emulated_on``). A study that
    searched in 16 bits trains its final pick in float32 (``EXACT_DTYPE``)."""
    if device.type == "cuda":
        return "bfloat16-mixed" if torch.cuda.get_device_capability(device) >= (8, 0) else "float32"
    if device.type == "cpu" and native_bfloat16_cpu(cpu_flags):
        return "bfloat16-mixed"
    return "float32"


# "0" or "1": what this machine's CPU is taken to have, in place of its flags (a virtual
# machine may hide them; tests pin it, so that ``auto`` means one thing on every machine)
NATIVE_BFLOAT16_CPU_ENV = "REFTSEARCH_NATIVE_BFLOAT16_CPU"


def native_bfloat16_cpu(flags: Collection[str] | None = None) -> bool:
    """Whether a CPU with these ``flags`` (default: this one's, from /proc/cpuinfo, or
    ``$REFTSEARCH_NATIVE_BFLOAT16_CPU`` when set; torch's CPUID checks where there is neither)
    computes bfloat16 matmuls natively."""
    if flags is None and os.environ.get(NATIVE_BFLOAT16_CPU_ENV) in ("0", "1"):
        return os.environ[NATIVE_BFLOAT16_CPU_ENV] == "1"
    if flags is None:
        flags = _cpu_flags()
    if flags is None:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return not BFLOAT16_CPU_FLAGS.isdisjoint(flags)


def _cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux lists them, or None (another system)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def _mix_precision(base: BaseModel) -> None:
    """Store the frozen weights of linear layers and embeddings (the LM head is often tied
    to one) in ``precision.matmul`` and run each linear layer in it, its input cast down.
    Its output stays there, as do the elementwise ops after it (attention, the MLP's
    activation), until the model adds it to the residual stream, which type promotion keeps
    in ``precision.states`` once the embeddings' outputs are cast up to it. Rotary position
    tables, which follow the stream's dtype, are cast down to the queries' and keys' (else
    attention would get float32 queries and keys but 16-bit values). A trainable head keeps
    its dtype: its weights are trained."""
    precision = base.precision
    for module in _frozen_modules(base):
        if isinstance(module, nn.Linear):
            module.to(precision.matmul)
            module.register_forward_pre_hook(_input_to_weight_dtype)
        elif isinstance(module, nn.Embedding):
            module.to(precision.matmul)
            module.register_forward_hook(partial(_outputs_to, dtype=precision.states))
        elif type(module).__name__.endswith("RotaryEmbedding"):
            module.register_forward_hook(partial(_outputs_to, dtype=precision.matmul))
    lm_head = base.model.get_output_embeddings() if base.head is None else None
    if lm_head is not None:  # logits leave the model in the stream's dtype, as a head's do
        lm_head.register_forward_hook(partial(_outputs_to, dtype=precision.states))


def _frozen_modules(base: BaseModel) -> Iterator[nn.Module]:
    """The model's modules but the trainable head's."""
    trained = set() if base.head is None else {id(m) for m in base.head.modules()}
    return (module for module in base.model.modules() if id(module) not in trained)


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def _outputs_to(module: nn.Module, args: tuple, output, dtype: torch.dtype):
    if isinstance(output, tuple):
        return tuple(tensor.to(dtype) for tensor in output)
    return output.to(dtype)


def emulated_on(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dtype``'s matmuls on ``device`` run emulated: 16-bit floats on a CPU without
    the instructions for them (oneDNN then converts to float32 and back)."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not native_bfloat16_cpu()
    if dtype == torch.float16:
        return not torch.cpu._is_amx_fp16_supported()
    return False


def _load(
    path: str, head: str, num_labels: int, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    check_builtin_name(path, list(BUILTIN_MODELS))
    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path](path, head, num_labels, dtype)
    directory = local_dir(path)
    location = path if directory is None else str(directory)
    return from_pretrained(path, location, head, num_labels, dtype)


def _finish(
    path: str,
    head: str,
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    dtype: str,
) -> BaseModel:
    config = model.config.get_text_config()
    blocks = _find_blocks(path, model)
    is_decoder = _is_decoder(model, blocks)
    if head == "causal_lm" and not is_decoder:
        raise ModelLoadError(
            f"{path}: head 'causal_lm' needs a decoder, but {config.model_type} is an encoder"
        )
    _fix_tokenizer(path, model, tokenizer, is_decoder)

    model.requires_grad_(False)
    model.eval()
    if head == "causal_lm":
        # transformers slices the positions it keeps logits for (``logits_to_keep``) as a
        # strided view; torch's linear then runs a batched matmul over a broadcast copy of
        # the weight, ~10x slower than on a contiguous input (SmolLM2's 49k-token LM head)
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        blocks=blocks,
        head=_find_head(model) if head == "classification" else None,
        hidden_size=int(config.hidden_size),
        num_layers=len(blocks),
        is_decoder=is_decoder,
        source=path,
        dtype=dtype,
    )


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


# --------------------------------------------------------------------------- model anatomy


def _find_blocks(path: str, model: transformers.PreTrainedModel) -> list[nn.Module]:
    base = model.base_model
    for dotted in _BLOCK_PATHS:
        module: nn.Module | None = base
        for name in dotted.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ModelLoadError(
        f"{path}: cannot find the transformer blocks of {type(model).__name__} "
        f"(looked for {list(_BLOCK_PATHS)} under the base model)"
    )


def _find_head(model: transformers.PreTrainedModel) -> nn.Module | None:
    """The modules a classification model adds on top of its base model, plus a pooler.

    BERT's pooler sits inside the base model but only feeds the classifier, so it is trained
    with it; Llama has just ``score``; DistilBERT ``pre_classifier`` and ``classifier``.
    """
    base = model.base_model
    parts = [child for child in model.children() if child is not base]
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module):
        parts.insert(0, pooler)
    parts = [part for part in parts if any(True for _ in part.parameters())]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else nn.ModuleList(parts)


def _is_decoder(model: transformers.PreTrainedModel, blocks: list[nn.Module]) -> bool:
    # Causal self-attention is what makes a decoder; transformers 5 attention modules carry it as
    # ``is_causal`` (LlamaConfig no longer has ``is_decoder`` at all).
    flags = [
        m.is_causal for m in blocks[0].modules() if isinstance(getattr(m, "is_causal", None), bool)
    ]
    if flags:
        return any(flags)
    config = model.config.get_text_config()
    return bool(getattr(config, "is_decoder", False)) or config.model_type in _DECODER_MODEL_TYPES


def _fix_tokenizer(
    path: str,
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    is_decoder: bool,
) -> None:
    if tokenizer.pad_token is None:
        # Decoders usually ship without a pad token; eos is the conventional stand-in and is
        # masked out anyway. Encoders without one are odd enough to refuse.
        fallback = (
            tokenizer.eos_token if is_decoder else (tokenizer.sep_token or tokenizer.unk_token)
        )
        if fallback is None:
            raise ModelLoadError(
                f"{path}: the tokenizer has no pad token and nothing to use for it"
            )
        tokenizer.pad_token = fallback
    if is_decoder and tokenizer.bos_token is None and tokenizer.eos_token is not None:
        # GPT-2 style: one <|endoftext|> serves as both; trials rely on a bos token existing.
        tokenizer.bos_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification decoders find each row's last token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id

    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    limit = min(positions, _DEFAULT_MAX_LENGTH) if positions else _DEFAULT_MAX_LENGTH
    if tokenizer.model_max_length > _ABSURD_MAX_LENGTH:
        tokenizer.model_max_length = limit
    elif positions and tokenizer.model_max_length > positions:
        # Longer inputs would index past absolute position embeddings and crash mid-trial.
        tokenizer.model_max_length = positions
