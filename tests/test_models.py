import os

# Tests must never reach the hub; set before transformers/huggingface_hub read it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import DEVICES  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from reftsearch.errors import BadInputError  # noqa: E402
from reftsearch.models.base import (
    DTYPES,
    NATIVE_BFLOAT16_CPU_ENV,
    BaseModel,
    default_dtype,
    emulated_on,
    load_base_model,
    resolve_device,
)
from reftsearch.models.builtin import BUILTIN_MODELS
from reftsearch.models.pretrained import ModelLoadError
from reftsearch.spec import study_file as spec  # noqa: E402

TINY = ["tiny:llama", "tiny:bert"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # In case another module imported huggingface_hub before the environment was set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def head_state(base: BaseModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in base.head_parameters()]


def logits(base: BaseModel, texts: list[str]) -> torch.Tensor:
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return base.model(**batch).logits


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("path", TINY)
def test_tiny_model_loads_fast_with_its_shape(path):
    base = load_base_model(path, "classification", num_labels=3)
    # tiny, so it builds in process in a fraction of a second: counted, not timed (a busy
    # machine's seconds say nothing about the model)
    assert sum(p.numel() for p in base.model.parameters()) < 250_000
    assert base.source == path
    assert base.hidden_size == 64
    assert base.num_layers == 4
    assert len(base.blocks) == 4
    assert base.model.config.num_labels == 3
    assert not base.model.training
    # The tokenizer must be fully covered by the embedding table.
    assert base.model.get_input_embeddings().num_embeddings >= len(base.tokenizer)
    assert base.model.config.pad_token_id == base.tokenizer.pad_token_id is not None
    assert base.device == torch.device("cpu")


def test_tiny_llama_blocks_are_the_decoder_layers():
    base = load_base_model("tiny:llama", "classification")
    assert base.is_decoder
    assert all(a is b for a, b in zip(base.blocks, base.model.model.layers, strict=True))
    assert base.head is base.model.score


def test_tiny_bert_blocks_are_the_encoder_layers():
    base = load_base_model("tiny:bert", "classification")
    assert not base.is_decoder
    assert all(a is b for a, b in zip(base.blocks, base.model.bert.encoder.layer, strict=True))
    head_ids = {id(p) for p in base.head_parameters()}
    expected = [*base.model.bert.pooler.parameters(), *base.model.classifier.parameters()]
    assert head_ids == {id(p) for p in expected}


def test_blocks_output_the_residual_stream_as_a_tensor():
    base = load_base_model("tiny:llama", "classification")
    seen = []
    handle = base.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits(base, ["hello"])
    finally:
        handle.remove()
    out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    assert out.shape == (1, 6, 64)  # <s> + 5 bytes


def test_tiny_models_are_the_same_every_time():
    a = load_base_model("tiny:llama", "classification")
    torch.manual_seed(123)  # the global RNG must not matter
    b = load_base_model("tiny:llama", "classification")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name


def test_tiny_llama_causal_lm_has_no_head():
    base = load_base_model("tiny:llama", "causal_lm")
    assert base.head is None
    assert base.head_parameters() == []
    assert base.is_decoder
    base.reset_head(0)  # a no-op, not an error
    batch = base.tokenizer(["abc"], return_tensors="pt")
    assert base.model(**batch).logits.shape == (1, 4, len(base.tokenizer))


def test_lm_head_gets_a_contiguous_input_when_only_the_last_logits_are_kept():
    # a strided input sends torch's linear to a slow batched matmul (see models._finish)
    base = load_base_model("tiny:llama", "causal_lm")
    seen = []
    base.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].is_contiguous())
    )
    ids = torch.randint(3, 50, (4, 9))
    logits = base.model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [True]
    torch.testing.assert_close(logits[:, -1], base.model(input_ids=ids).logits[:, -1])


def test_encoder_refuses_causal_lm_head():
    with pytest.raises(ModelLoadError, match="tiny:bert"):
        load_base_model("tiny:bert", "causal_lm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_applied(dtype):
    name = str(dtype).removeprefix("torch.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = load_base_model("tiny:llama", "classification", dtype=name)
    emulated = [w for w in caught if "is emulated" in str(w.message)]
    # a CPU without the 16-bit instructions is told that float32 is faster there
    assert len(emulated) == emulated_on(dtype, torch.device("cpu"))
    assert {p.dtype for p in base.model.parameters()} == {dtype}
    base.reset_head(0)
    assert {p.dtype for p in base.head_parameters()} == {dtype}


def test_the_spec_accepts_every_dtype_the_loader_knows():
    assert set(spec.DTYPES) == {*DTYPES, "auto"}


@pytest.mark.parametrize("device", DEVICES)
def test_auto_dtype_is_mixed_on_a_gpu_with_bfloat16_math_else_float32(device):
    base = load_base_model("tiny:llama", "causal_lm", dtype="auto", device=device)
    native = device == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    assert base.dtype == ("bfloat16-mixed" if native else "float32")
    assert {p.dtype for p in base.blocks[0].parameters()} == (
        {torch.bfloat16, torch.float32} if native else {torch.float32}
    )


@pytest.mark.parametrize("model", ["tiny:llama", "tiny:bert"])
def test_mixed_precision_runs_frozen_matmuls_in_bfloat16_and_trains_the_head_in_float32(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = load_base_model(model, "classification", dtype="bfloat16-mixed")
    assert len([w for w in caught if "is emulated" in str(w.message)]) == emulated_on(
        torch.bfloat16, torch.device("cpu")
    )
    mixed.reset_head(0)
    head = {id(p) for p in mixed.head_parameters()}
    assert head and all(p.requires_grad for p in mixed.head_parameters())
    for module in mixed.model.modules():
        for param in module.parameters(recurse=False):
            matmul = isinstance(module, torch.nn.Linear | torch.nn.Embedding)
            want = torch.bfloat16 if matmul and id(param) not in head else torch.float32
            assert param.dtype == want, (type(module).__name__, param.dtype)
    exact = load_base_model(model, "classification")
    exact.reset_head(0)
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8], [11, 4, 6, 19, 2, 13, 10]])
    want = exact.model(input_ids=ids, output_hidden_states=True)
    got = mixed.model(input_ids=ids, output_hidden_states=True)
    assert {h.dtype for h in got.hidden_states} == {torch.float32} == {got.logits.dtype}
    # bfloat16 keeps 8 bits of mantissa (unit roundoff u = 2**-8), whatever kernel rounds:
    # the embeddings are rounded once (the first states within u of float32's) and each block
    # adds outputs of matmuls whose inputs, weights and results are rounded: 2u more per block,
    # relative to the states' size (measured: 0.4u, then 1.4u after four blocks)
    u = torch.finfo(torch.bfloat16).eps / 2
    pairs = zip(got.hidden_states, want.hidden_states, strict=True)
    for depth, (got_states, want_states) in enumerate(pairs):
        error = (got_states - want_states).norm() / want_states.norm()
        assert error <= (1 + 2 * depth) * u, f"states after {depth} blocks: {error / u:.2f}u"


def test_an_edit_smaller_than_bfloat16_rounding_survives_only_a_mixed_stream():
    """What ``-mixed`` is for: a trained intervention's small edit to the residual stream."""
    ids = torch.tensor([[5, 9, 14, 3, 7, 21, 8]])

    def last_states(dtype: str, edit: float) -> torch.Tensor:
        base = load_base_model("tiny:llama", "causal_lm", dtype=dtype)
        add = base.blocks[0].register_forward_hook(lambda m, args, out: out + edit * out)
        with add, torch.no_grad():
            return base.model.base_model(input_ids=ids).last_hidden_state

    for dtype, survives in (("bfloat16-mixed", True), ("bfloat16", False)):
        # 1e-3 of each value: less than half a bfloat16 step (2^-9 of it at least)
        plain, edited = last_states(dtype, 0.0), last_states(dtype, 1e-3)
        assert (not torch.equal(edited, plain)) is survives, dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux CPU flags")
def test_bfloat16_is_emulated_where_the_cpu_flags_lack_its_instructions(monkeypatch):
    monkeypatch.delenv(NATIVE_BFLOAT16_CPU_ENV)  # conftest pins it
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert emulated_on(torch.bfloat16, torch.device("cpu")) is not native
    assert not emulated_on(torch.float32, torch.device("cpu"))
    assert not emulated_on(torch.bfloat16, torch.device("meta"))  # only a CPU emulates


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "float32"),  # this workplace's AMD EPYC: bfloat16 is emulated
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16-mixed"),  # AVX512-BF16 (Cooper Lake, Zen 4)
        ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, "bfloat16-mixed"),  # AMX (Sapphire Rapids)
        ({"avx2", "avx512f", "amx_tile"}, "float32"),  # AMX tiles without their bfloat16 math
    ],
)
def test_auto_dtype_is_bfloat16_mixed_where_the_cpu_has_bfloat16_math(flags, expected):
    assert default_dtype(torch.device("cpu"), flags) == expected


@pytest.mark.parametrize("native", ["0", "1"])
def test_the_environment_says_what_the_cpu_has(monkeypatch, native):
    monkeypatch.setenv(NATIVE_BFLOAT16_CPU_ENV, native)
    want = "bfloat16-mixed" if native == "1" else "float32"
    assert default_dtype(torch.device("cpu")) == want
    # given flags are a CPU's own, whatever this machine is taken to have
    assert default_dtype(torch.device("cpu"), {"avx2"}) == "float32"


def test_the_emulation_warning_says_when_the_environment_decided_it(monkeypatch):
    """A CI log on a CPU with AMX said it "lacks the AVX512-BF16/AMX instructions": the tests'
    pin had said so, not the CPU."""
    monkeypatch.setenv(NATIVE_BFLOAT16_CPU_ENV, "0")
    with pytest.warns(UserWarning, match=f"{NATIVE_BFLOAT16_CPU_ENV}=0 says it lacks the "):
        load_base_model("tiny:llama", "causal_lm", dtype="bfloat16-mixed")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux CPU flags")
def test_auto_dtype_reads_this_cpus_flags(monkeypatch):
    monkeypatch.delenv(NATIVE_BFLOAT16_CPU_ENV)  # conftest pins it
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert default_dtype(torch.device("cpu")) == ("bfloat16-mixed" if native else "float32")
    assert load_base_model("tiny:llama", "causal_lm", dtype="auto").dtype == (
        "bfloat16-mixed" if native else "float32"
    )


def test_auto_device_is_cuda_when_torch_sees_one_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert load_base_model("tiny:llama", "causal_lm", device="auto").device.type == expected
    assert load_base_model("tiny:llama", "causal_lm").device.type == "cpu"  # the default


def test_a_cuda_device_torch_does_not_see_is_refused():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 without any)
    with pytest.raises(ModelLoadError, match=f"torch sees {torch.cuda.device_count()} CUDA"):
        load_base_model("tiny:llama", "causal_lm", device=missing)


# ----------------------------------------------------------------------------- freezing, heads


@pytest.mark.parametrize("path", TINY)
def test_base_is_frozen_and_only_the_head_trains_after_reset(path):
    base = load_base_model(path, "classification")
    assert not any(p.requires_grad for p in base.model.parameters())
    base.reset_head(0)
    head_ids = {id(p) for p in base.head_parameters()}
    assert head_ids
    for p in base.model.parameters():
        assert p.requires_grad == (id(p) in head_ids)


@pytest.mark.parametrize("path", TINY)
def test_reset_head_is_deterministic_in_the_seed(path):
    base = load_base_model(path, "classification")
    loaded = head_state(base)
    base.reset_head(7)
    first = head_state(base)
    base.reset_head(8)
    other = head_state(base)
    base.reset_head(7)
    again = head_state(base)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(first, other, strict=True))
    # It really re-initialises, rather than leaving the weights as loaded.
    assert any(not torch.equal(x, y) for x, y in zip(first, loaded, strict=True))
    # Weights look like the model's own init (normal, std initializer_range), not garbage.
    weight = base.head_parameters()[-2 if path == "tiny:bert" else -1]
    assert 0.005 < weight.std().item() < 0.05


def test_reset_head_leaves_the_global_rng_alone():
    base = load_base_model("tiny:bert", "classification")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    base.reset_head(1)
    assert torch.equal(torch.rand(3), expected)


def test_head_gets_gradients_and_base_does_not():
    base = load_base_model("tiny:bert", "classification")
    base.reset_head(0)
    batch = base.tokenizer(["good", "bad"], padding=True, return_tensors="pt")
    out = base.model(**batch, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in base.head_parameters())
    assert base.model.bert.embeddings.word_embeddings.weight.grad is None


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("path", TINY)
def test_tokenizer_round_trips_text(path):
    tok = load_base_model(path, "classification").tokenizer
    text = "Héllo, wörld! 你好 🙂\nnew line"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # One token per UTF-8 byte plus the special tokens.
    specials = 1 if path == "tiny:llama" else 2
    assert len(ids) == len(text.encode("utf-8")) + specials


def test_llama_tokenizer_adds_bos():
    tok = load_base_model("tiny:llama", "classification").tokenizer
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    ids = tok("ab")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "a", "b"]
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0] == [tok.bos_token_id, ids[1], tok.pad_token_id, tok.pad_token_id]
    assert batch["attention_mask"][0] == [1, 1, 0, 0]


def test_bert_tokenizer_adds_cls_sep_and_pairs():
    tok = load_base_model("tiny:bert", "classification").tokenizer
    assert tok.pad_token == "[PAD]"
    single = tok("ab")
    assert tok.convert_ids_to_tokens(single["input_ids"]) == ["[CLS]", "a", "b", "[SEP]"]
    pair = tok("ab", "c")
    assert tok.convert_ids_to_tokens(pair["input_ids"]) == [
        "[CLS]", "a", "b", "[SEP]", "c", "[SEP]"
    ]  # fmt: skip
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- save / reload


@pytest.mark.parametrize("path", TINY)
def test_save_and_reload_gives_identical_logits(path, tmp_path):
    base = load_base_model(path, "classification", num_labels=3)
    base.reset_head(3)
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)

    texts = ["first example", "a second, longer example", "x"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("héllo", "b")["input_ids"] == base.tokenizer("héllo", "b")["input_ids"]
    assert tok.pad_token_id == base.tokenizer.pad_token_id
    assert tok.model_input_names == base.tokenizer.model_input_names
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded = model(**batch).logits
    assert torch.equal(reloaded, logits(base, texts))

    # Loading the directory through load_base_model keeps the trained head as saved.
    again = load_base_model(str(tmp_path), "classification", num_labels=3)
    assert again.source == str(tmp_path)
    assert again.is_decoder == base.is_decoder
    assert again.num_layers == 4
    assert torch.equal(logits(again, texts), logits(base, texts))


# the load and drop measured in a process of its own: in the suite's process the heap that
# earlier tests freed and their threads' allocations moved the RSS by tens of MB either way
LOAD_AND_DROP = """
import ctypes, gc, json, sys
import psutil
from reftsearch.models.base import load_base_model
path, process = sys.argv[1], psutil.Process()
# a first load and drop keeps what any load keeps for good (imports, caches: 26 MB once in a
# clean CI run), so that the second shows what the weights themselves leave behind
load_base_model(path, "causal_lm", dtype="float32", device="cpu").drop_weights()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = process.memory_info().rss
base = load_base_model(path, "causal_lm", dtype="float32", device="cpu")
weights = sum(p.numel() * p.element_size() for p in base.model.parameters())
base.drop_weights()
print(json.dumps({
    "before": before, "after": process.memory_info().rss, "weights": weights,
    "devices": sorted({p.device.type for p in base.model.parameters()}),
    "shape": [base.num_layers, base.hidden_size, base.is_decoder],
}))
"""


def test_dropped_weights_leave_the_structure_and_give_their_memory_back(tmp_path):
    """What a Ray driver does while its workers search: a bfloat16 checkpoint loaded in
    float32 (the CPU default) is a full-size copy on the heap, which glibc kept after it was
    freed until ``malloc_trim``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = load_base_model("tiny:llama", "causal_lm")
    config = LlamaConfig(
        vocab_size=tiny.model.config.vocab_size, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_DROP, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.splitlines()[-1])
    assert measured["weights"] > 80 * 2**20
    # what the load added to the RSS varies with where the allocator put it (43 to 85 MB of
    # these 85 MB in runs here): the end state is what a driver relies on
    assert measured["after"] < measured["before"] + 0.25 * measured["weights"], measured
    assert measured["devices"] == ["meta"]
    assert measured["shape"] == [8, 512, True]


# ----------------------------------------------------------------------------- errors


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(ModelLoadError, match="must be one of") as info:
        load_base_model("tiny:xyz", "classification")
    message = str(info.value)
    assert "tiny:xyz" in message
    for name in BUILTIN_MODELS:
        assert name in message


def test_model_load_error_is_a_value_error_and_bad_input():
    assert issubclass(ModelLoadError, ValueError)
    assert issubclass(ModelLoadError, BadInputError)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"head": "regression"}, "head must be one of"),
        ({"head": "classification", "dtype": "float64"}, "dtype must be one of"),
        ({"head": "classification", "num_labels": 0}, "num_labels"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, needle):
    with pytest.raises(ModelLoadError, match=needle):
        load_base_model("tiny:llama", **kwargs)


def test_missing_local_directory_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as info:
        load_base_model(missing, "classification")
    assert missing in str(info.value)


def test_directory_without_config_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_base_model(str(tmp_path), "classification")
    assert str(tmp_path) in str(info.value)


def test_offline_hub_id_raises_model_load_error():
    hub_id = "reftsearch-tests/definitely-not-a-model"
    with pytest.raises(ModelLoadError) as info:
        load_base_model(hub_id, "classification")
    assert hub_id in str(info.value)


# ----------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_embedded_minilm_loads_offline():
    base = load_base_model("embedded:minilm", "classification", num_labels=2)
    assert base.hidden_size == 384
    assert base.num_layers == 6
    assert not base.is_decoder
    assert base.tokenizer.pad_token_id is not None
    assert base.tokenizer.model_max_length <= 512
    assert not any(p.requires_grad for p in base.model.parameters())
    base.reset_head(0)
    out = logits(base, ["the movie was great", "terrible"])
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()
    # The encoder weights are the pretrained ones, not a random init: sentences that share
    # words have closer mean-pooled embeddings than unrelated ones.
    batch = base.tokenizer(
        ["a cat sits on the mat", "a cat is sitting on a mat", "stock prices fell sharply"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = base.model.bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2
