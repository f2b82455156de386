"""Frozen-prefix activation cache: block outputs below the interventions, computed once.

The base model is frozen and in eval mode, so the output of block ``L`` (before any
intervention edits it) is the same for an example in every epoch and in every trial whose
lowest intervened layer is ``L``. ``PrefixCache`` computes it once per worker per (layer,
split), keeps it within a memory budget (least recently used first out), and replays it.

Replaying swaps the forward of blocks ``0..L`` for stand-ins during one forward pass: blocks
below ``L`` hand their input through, block ``L`` returns the cached rows of the batch. The
model's own forward still builds the attention mask, position ids and rotary embeddings and
calls the upper blocks with the arguments its family needs (Llama-style decoders, BERT-style
encoders alike), its head still pools as usual, and the intervention hooks on block ``L`` and
above fire as they do without a cache.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from reftsearch.data.batches import Batch, Encoded, batches, pass_tokens
from reftsearch.engine.frozen_store import (
    FrozenStore,
    Pending,
    entry_key,
    examples_key,
    model_key,
)
from reftsearch.methods.reft.positions import unedited_prefix
from reftsearch.models.base import BaseModel, kv_argument
from reftsearch.progress import Log, Progress


@dataclass
class CachedStates:
    """Block ``layer``'s output for every example of one split, unpadded and concatenated."""

    layer: int
    examples: list[Encoded]  # the tokenized split these rows belong to
    flat: torch.Tensor  # [total tokens + 1, hidden]; the last row is zeros, used for padding
    starts: torch.Tensor  # [examples] where each example's tokens start in ``flat``
    as_tuple: bool  # the block returns ``(hidden, ...)`` rather than a tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def gather(self, rows: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The cached states of examples ``rows`` (``[rows, seq, hidden]``), laid out as a
        batch with attention ``mask`` and left-padding ``offsets`` holds them."""
        steps = torch.arange(mask.shape[1], device=mask.device)[None] - offsets[:, None]
        index = self.starts.to(mask.device)[rows][:, None] + steps
        pad_row = len(self.flat) - 1
        rows_index = torch.where(mask.bool(), index, pad_row).to(self.flat.device)
        return self.flat[rows_index].to(mask.device)  # spilled entries live in CPU files

    def replaying(self, blocks: list[nn.Module], batch: Batch) -> AbstractContextManager:
        """``replaying`` the cached states of ``batch`` (made by ``collate_rows``)."""
        if batch.rows is None:
            raise ValueError("a batch replayed from the cache must know its rows (collate_rows)")
        states = self.gather(batch.rows, batch.attention_mask, batch.offsets)
        return replaying(blocks, self.layer, states, self.as_tuple)


@contextmanager
def replaying(
    blocks: list[nn.Module], layer: int, states: torch.Tensor, as_tuple: bool
) -> Iterator[None]:
    """Within this context the model's next forward starts from ``states``, the output of
    block ``layer``: blocks ``0..layer`` do not run (their forward hooks still do)."""
    output = (states,) if as_tuple else states

    def skip(hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    def replay(*args, **kwargs):
        return output

    patched = blocks[: layer + 1]
    # an instance attribute shadows the class's forward; one set earlier (accelerate's
    # dispatch hooks do that) is put back afterwards
    saved = [block.__dict__.get("forward") for block in patched]
    for block in blocks[:layer]:
        block.forward = skip
    blocks[layer].forward = replay
    try:
        yield
    finally:
        for block, forward in zip(patched, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@dataclass
class FrozenPast:
    """The cached first tokens of each row of a batch: their mask and their frozen keys and
    values at every block, handed to the model as its key/value cache."""

    mask: torch.Tensor  # [rows, width], 1 where a row has a cached token
    # per block, [rows, heads, width, dim]; [rows, 1, width, 1] zeros for a block whose
    # attention does not run (``FrozenParts.add_past``)
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    argument: str  # the model forward's name for a key/value cache

    def model_inputs(self, attention_mask: torch.Tensor) -> dict:
        # a fresh cache per forward: the forward appends the batch's own keys and values to it
        cache = DynamicCache(ddp_cache_data=self.keys_values)
        return {"attention_mask": torch.cat([self.mask, attention_mask], 1), self.argument: cache}


@dataclass
class FrozenKeysValues:
    """Every block's attention keys and values for the prompt tokens of one split, as the
    frozen model computes them (causal decoders only), unpadded and concatenated."""

    examples: list[Encoded]
    both: torch.Tensor  # [2, blocks, prompt tokens + 1, heads, dim]: keys, then values;
    # each block's last row is zeros
    starts: torch.Tensor  # [examples] where each example's tokens start
    argument: str

    @property
    def keys(self) -> torch.Tensor:
        return self.both[0]

    @property
    def values(self) -> torch.Tensor:
        return self.both[1]

    @property
    def nbytes(self) -> int:
        return self.both.numel() * self.both.element_size()

    def gather(
        self,
        rows: torch.Tensor,
        first: torch.Tensor,
        last: torch.Tensor,
        offsets: torch.Tensor,
        width: int,
        first_block: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[blocks, rows, heads, width, dim]`` of the blocks from
        ``first_block`` on: tokens ``first[b] <= t < last[b]`` of example ``rows[b]`` at
        columns ``t + offsets[b]``, zeros elsewhere."""
        tokens = torch.arange(width, device=offsets.device)[None] - offsets[:, None]
        valid = (tokens >= first[:, None]) & (tokens < last[:, None])
        index = self.starts.to(offsets.device)[rows][:, None] + tokens
        index = torch.where(valid, index, self.keys.shape[1] - 1).to(self.keys.device)
        keys, values = self.keys[first_block:, index], self.values[first_block:, index]
        return keys.transpose(2, 3).to(offsets.device), values.transpose(2, 3).to(offsets.device)


@dataclass
class FrozenParts:
    """What one forward pass takes from the cache instead of computing it: block ``layer``'s
    outputs and, in a decoder, the keys and values of each row's unedited first tokens. A
    batch's rows come in groups (a packed trial's rows each), each from its own split list."""

    layer: int
    states: list[CachedStates]  # per group
    keys_values: list[FrozenKeysValues] | None  # per group; None: every row starts at token 0

    def starts(self, groups: list[tuple[list[Encoded], int, int]]) -> list[int] | None:
        """Each row's first token to compute: groups of (examples, prefix, suffix)."""
        if self.keys_values is None:
            return None
        return [
            start
            for examples, prefix, suffix in groups
            for start in unedited_prefix(
                torch.tensor([e.prompt_length for e in examples]), prefix, suffix
            ).tolist()
        ]

    def add_past(
        self, batch: Batch, spans: list[slice], starts: list[int], every_block: bool = False
    ) -> None:
        """Give ``batch`` (collated with ``starts``) the frozen keys and values it skips: of
        the blocks above ``layer``, the ones its replayed forward runs, or of ``every_block``
        (generation's one-token steps run them all). Gathering and copying all of them took
        as long as the matmuls of a dev pass from layer 15 of SmolLM2."""
        if self.keys_values is None:
            return
        skipped = torch.tensor(starts, device=batch.offsets.device)
        width = int(skipped.max())
        if width == 0:
            return
        zeros = torch.zeros_like(skipped)
        first_block = 0 if every_block else self.layer + 1
        parts = [
            kv.gather(batch.rows[span], zeros[span], skipped[span], zeros[span], width, first_block)
            for kv, span in zip(self.keys_values, spans, strict=True)
        ]
        keys, values = parts[0]
        if len(parts) > 1:
            keys = torch.cat([k for k, _ in parts], dim=1)
            values = torch.cat([v for _, v in parts], dim=1)
        mask = (torch.arange(width, device=skipped.device)[None] < skipped[:, None]).long()
        keys_values = list(zip(keys, values, strict=True))
        if first_block > 0:
            # the blocks below are replayed, never attended: stand-ins of the cache's length,
            # one value wide (a model reads that length from block 0's entry, or another's)
            length = keys.new_zeros((len(starts), 1, width, 1))
            keys_values = [*[(length, length)] * first_block, *keys_values]
        batch.past = FrozenPast(mask, keys_values, self.keys_values[0].argument)

    def replaying(self, blocks: list[nn.Module], batch: Batch, spans: list[slice]):
        """``replaying`` block ``layer``'s cached outputs for ``batch``'s rows."""
        parts = [
            states.gather(batch.rows[span], batch.attention_mask[span], batch.offsets[span])
            for states, span in zip(self.states, spans, strict=True)
        ]
        return replaying(blocks, self.layer, torch.cat(parts), self.states[0].as_tuple)


KEYS_VALUES = "keys_values"  # what ``compute_frozen``'s placement calls the keys and values


@dataclass(frozen=True)
class Tier:
    """Where cache entries live, and how many bytes of them fit there: memory on the model's
    device, or (with a ``folder``) memory-mapped files in it."""

    budget_bytes: int
    folder: Path | None = None


class PrefixCache:
    """Cached block outputs per (layer, split), and a decoder's frozen keys and values per
    split, least recently used dropped past the budget.

    What does not fit is not cached (``states`` returns None and the trial runs the full
    model, just slower), unless it fits the spill budget: then it lives in memory-mapped
    files in ``spill_dir`` (read back a batch at a time, through the page cache). With a
    ``store``, every entry a pass computes is also kept on disk for other processes and later
    runs, and one missing here is read from there before it is computed
    (reftsearch.engine.frozen_store). Keys and
    values are the optional part: they never push block outputs out, so a tight budget cannot
    make the two evict each other step after step. Whatever is missing for a split is
    computed in one pass, from the highest cached layer below when only block outputs are
    missing.

    ``log``, when set (a worker sets its own), hears of each pass as it starts and ends, and
    every ``progress_every_s`` seconds in between how far it has come: on a CPU one runs for
    minutes, and nothing else is said meanwhile.
    """

    log: Log | None = None
    progress_every_s = 30.0  # how often a pass says how far it has come

    def __init__(
        self,
        budget_mb: float,
        expected_layers: Iterable[int] = (),
        spill_mb: float = 0.0,
        spill_dir: Path | None = None,
        store: FrozenStore | None = None,
    ) -> None:
        self.memory = Tier(int(budget_mb * 2**20))
        self.spill = Tier(int(spill_mb * 2**20), spill_dir) if spill_mb > 0 else None
        # the lowest intervened layers trials may ask for (the space's): a pass that computes
        # one of their outputs anyway keeps it too, in room that is free (never evicting)
        self.expected_layers = frozenset(expected_layers)
        # keyed by the split's list too (an entry holds it, so its id cannot be reused): a
        # worker may train on several subsets of one split (reftsearch.search.fidelity's ladder)
        self._entries: OrderedDict[tuple, CachedStates | FrozenKeysValues] = OrderedDict()
        self._tier_of: dict[tuple, Tier] = {}
        self.store = store
        self._examples_keys: dict[int, tuple[list[Encoded], str]] = {}  # by the list's id

    @property
    def budget_bytes(self) -> int:
        return self.memory.budget_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the entries held in memory (spilled ones excluded)."""
        return self._used(self.memory)

    @property
    def spilled_bytes(self) -> int:
        return 0 if self.spill is None else self._used(self.spill)

    def states(
        self, base: BaseModel, layer: int, split: str, examples: list[Encoded]
    ) -> CachedStates | None:
        """Block ``layer``'s outputs for ``examples``, cached."""
        return self._fetch(base, layer, split, examples, keys_values=False)[0]

    def frozen(
        self, base: BaseModel, layer: int, split: str, groups: list[list[Encoded]]
    ) -> FrozenParts | None:
        """Block ``layer``'s outputs (and a decoder's frozen keys and values) for each group's
        split list; None when the outputs do not fit the budget."""
        fetched = [
            self._fetch(base, layer, split, examples, base.is_decoder) for examples in groups
        ]
        states = [entry for entry, _ in fetched]
        if any(entry is None for entry in states):
            return None
        keys_values = [entry for _, entry in fetched]
        if any(entry is None for entry in keys_values):
            keys_values = None
        return FrozenParts(layer, states, keys_values)

    def _fetch(
        self, base: BaseModel, layer: int, split: str, examples: list[Encoded], keys_values: bool
    ) -> tuple[CachedStates | None, FrozenKeysValues | None]:
        def states_key(block: int) -> tuple:
            return ("states", block, split, id(examples))

        kv_key = ("keys_values", split, id(examples))
        states, kv = self._get(states_key(layer)), self._get(kv_key) if keys_values else None
        if states is not None and (kv is not None or not keys_values):
            return states, kv  # the common case: every training step of every trial
        per_layer = _nbytes(base, examples, layer)
        # where each new entry goes: memory first, else the spill files, else nowhere
        homes: dict[int | str, Tier] = {}
        sizes: dict[int | str, int] = {}
        if states is None:
            home = self._make_room(per_layer)
            if home is None:
                return None, kv
            homes[layer], sizes[layer] = home, per_layer
        if keys_values and kv is None:
            sizes[KEYS_VALUES] = _nbytes(base, examples, KEYS_VALUES)
            home = self._free_tier(sizes[KEYS_VALUES], homes, sizes)
            if home is not None:
                homes[KEYS_VALUES] = home
        if not homes:
            return states, kv
        store = self._store_for(base)
        try:
            with nullcontext() if store is None else self._computing(store, base, split, examples):
                if store is not None:  # what another process, or an earlier run, computed
                    self._read(store, base, split, examples, homes)
                if homes:
                    self._compute(base, layer, split, examples, homes, sizes, store)
        except _SpillFailed as err:  # full or not writable: go on with memory alone
            self._warn(f"cache spill disabled ({err.__cause__}): the cache keeps memory only")
            self.spill = None
            return self._fetch(base, layer, split, examples, keys_values)
        return self._get(states_key(layer)), self._get(kv_key) if keys_values else None

    def _compute(
        self,
        base: BaseModel,
        layer: int,
        split: str,
        examples: list[Encoded],
        homes: dict[int | str, Tier],
        sizes: dict[int | str, int],
        store: FrozenStore | None,
    ) -> None:
        """One frozen pass over ``examples`` for what ``homes`` places (``layer``'s outputs,
        keys and values), and the expected layers it computes anyway, kept in free room."""
        want_kv = KEYS_VALUES in homes
        below = None if want_kv else self._highest_below(layer, examples)
        # a full pass (for keys and values) runs every block, one that stops at ``layer``
        # those above ``below``
        lowest = below.layer if below is not None else -1
        highest = base.num_layers if want_kv else layer
        extra = [
            other
            for other in sorted(self.expected_layers)
            if lowest < other < highest and other not in homes
            if ("states", other, split, id(examples)) not in self._entries
            if store is None or not store.path(self._store_key(base, examples, other)).exists()
        ][: max(0, self._free(self.memory, homes, sizes) // _nbytes(base, examples, layer))]
        homes.update(dict.fromkeys(extra, self.memory))
        wanted = [what for what in homes if what != KEYS_VALUES]
        last = base.num_layers - 1 if want_kv else layer
        what = _describe_pass(len(examples), split, lowest + 1, last, wanted, want_kv)
        self._report(f"{what}...")
        started = time.perf_counter()
        pending: dict[int | str, Pending] = {}

        def allocate(what: int | str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            # on a CPU, or in the spill folder, the store's file is the entry itself
            folder = homes[what].folder
            if store is not None and (folder is not None or base.device.type == "cpu"):
                try:
                    stored = store.create(self._store_key(base, examples, what), shape, dtype)
                except OSError as err:
                    self._drop_store(err)
                else:
                    if stored is not None:
                        pending[what] = stored
                        return stored.tensor
            if folder is None:
                return torch.empty(shape, dtype=dtype, device=base.device)
            try:
                return _mapped(folder, shape, dtype)
            except OSError as err:
                raise _SpillFailed from err

        try:
            computed, computed_kv = compute_frozen(
                base,
                examples,
                wanted,
                want_kv,
                below,
                allocate=allocate,
                progress=self._progress(what),
            )
        except BaseException:
            for stored in pending.values():
                store.discard(stored)
            raise
        for entry in computed:
            self._put(("states", entry.layer, split, id(examples)), entry, homes[entry.layer])
        if want_kv:
            self._put(("keys_values", split, id(examples)), computed_kv, homes[KEYS_VALUES])
        if store is not None:
            self._keep(store, base, examples, computed, computed_kv, pending)
        kept = sum(entry.nbytes for entry in computed) + (computed_kv.nbytes if want_kv else 0)
        self._report(f"{what}: {time.perf_counter() - started:.1f}s, {kept / 2**20:.0f} MB kept")

    def _keep(
        self,
        store: FrozenStore,
        base: BaseModel,
        examples: list[Encoded],
        computed: list[CachedStates],
        computed_kv: FrozenKeysValues | None,
        pending: dict[int | str, Pending],
    ) -> None:
        """Write what a pass computed to the store: seal the files it was computed into, or
        copy what it computed on the model's GPU."""
        outputs: dict[int | str, tuple[torch.Tensor, dict]] = {
            entry.layer: (entry.flat, {"as_tuple": entry.as_tuple}) for entry in computed
        }
        if computed_kv is not None:
            outputs[KEYS_VALUES] = (computed_kv.both, {})
        try:
            for what, (tensor, meta) in outputs.items():
                if what in pending:
                    store.commit(pending.pop(what), meta)
                elif self.store is not None:
                    store.save(self._store_key(base, examples, what), tensor, meta)
        except OSError as err:
            self._drop_store(err)
        finally:
            for stored in pending.values():
                store.discard(stored)

    def _read(
        self,
        store: FrozenStore,
        base: BaseModel,
        split: str,
        examples: list[Encoded],
        homes: dict[int | str, Tier],
    ) -> None:
        """Take what ``homes`` places from the store where it holds it (and drop it from
        ``homes``): mapped from its file, or copied to the model's GPU."""
        found = []
        for what, tier in list(homes.items()):
            read = store.load(
                self._store_key(base, examples, what),
                _shape(base, examples, what),
                _dtype(base, what),
            )
            if read is None:
                continue
            tensor, meta = read
            if tier.folder is None:
                tensor = tensor.to(base.device)
            if what == KEYS_VALUES:
                entry = _keys_values(base, examples, tensor)
                self._put(("keys_values", split, id(examples)), entry, tier)
            else:
                entry = _states(what, examples, tensor, meta["as_tuple"])
                self._put(("states", what, split, id(examples)), entry, tier)
            found.append(what)
            del homes[what]
        if found:
            named = [f"layer {what}" for what in found if what != KEYS_VALUES]
            named += ["keys/values"] if KEYS_VALUES in found else []
            self._report(
                f"frozen {' and '.join(named)} of {len(examples)} {split} examples read from "
                f"{store.folder}"
            )

    @contextmanager
    def _computing(
        self, store: FrozenStore, base: BaseModel, split: str, examples: list[Encoded]
    ) -> Iterator[None]:
        """The store's lock on passes over ``examples``: the first process computes them,
        the others wait for its files."""

        def waiting() -> None:
            self._report(
                f"waiting for another process's frozen pass over {len(examples)} {split} "
                f"examples (in {store.folder})"
            )

        with store.computing(self._store_key(base, examples, "lock"), waiting):
            yield

    def _store_for(self, base: BaseModel) -> FrozenStore | None:
        """The store, when there is one and ``base`` has its weights to identify it by."""
        if self.store is None or model_key(base) is None:
            return None
        try:
            self.store.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self._drop_store(err)
        return self.store

    def _store_key(self, base: BaseModel, examples: list[Encoded], what: int | str) -> str:
        held = self._examples_keys.get(id(examples))
        if held is None or held[0] is not examples:
            held = self._examples_keys[id(examples)] = (examples, examples_key(examples))
        return entry_key(model_key(base), held[1], str(what))

    def _drop_store(self, err: OSError) -> None:
        if self.store is not None:
            self._warn(f"frozen store disabled ({err}): frozen passes are not kept on disk")
            self.store = None

    def _warn(self, line: str) -> None:
        """A line of the run's output (a Python warning with a source line read as a crash),
        or a warning where the cache has no log (a library caller's)."""
        if self.log is not None:
            self.log(line)
        else:
            warnings.warn(line, stacklevel=3)

    def _progress(self, what: str) -> Progress | None:
        return None if self.log is None else Progress(what, self.log, self.progress_every_s)

    def _report(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _get(self, key: tuple):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _put(self, key: tuple, entry, tier: Tier):
        self._entries[key] = entry
        self._tier_of[key] = tier
        return entry

    def _tiers(self) -> list[Tier]:
        return [self.memory] if self.spill is None else [self.memory, self.spill]

    def _used(self, tier: Tier) -> int:
        return sum(e.nbytes for k, e in self._entries.items() if self._tier_of[k] is tier)

    def _free(self, tier: Tier, homes: dict, sizes: dict) -> int:
        """Bytes ``tier`` has free once what is already placed there (``homes``, of
        ``sizes`` bytes each) is in."""
        placed = sum(sizes[what] for what, home in homes.items() if home is tier)
        return tier.budget_bytes - self._used(tier) - placed

    def _free_tier(self, need: int, homes: dict, sizes: dict) -> Tier | None:
        """The first tier with ``need`` bytes free (evicting nothing)."""
        return next((t for t in self._tiers() if self._free(t, homes, sizes) >= need), None)

    def _make_room(self, need: int) -> Tier | None:
        """The first tier that can hold ``need`` bytes, once its least recently used entries
        are dropped until they are free; None: none can."""
        tier = next((t for t in self._tiers() if need <= t.budget_bytes), None)
        if tier is None:
            return None
        for key in list(self._entries):
            if tier.budget_bytes - self._used(tier) >= need:
                break
            if self._tier_of[key] is tier:
                del self._entries[key], self._tier_of[key]
        return tier

    def _highest_below(self, layer: int, examples: list[Encoded]) -> CachedStates | None:
        """The highest cached block outputs below ``layer`` for this very split list."""
        lower = [
            entry
            for entry in self._entries.values()
            if isinstance(entry, CachedStates) and entry.examples is examples
            if entry.layer < layer
        ]
        return max(lower, key=lambda entry: entry.layer, default=None)


def _describe_pass(
    examples: int, split: str, first: int, last: int, layers: list[int], keys_values: bool
) -> str:
    """``frozen pass over 512 train examples (blocks 0-29: layers 12, 20 and keys/values)``."""
    names = ", ".join(map(str, sorted(layers)))
    kept = [f"layer {names}" if len(layers) == 1 else f"layers {names}"] if layers else []
    kept += ["keys/values"] if keys_values else []
    blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
    return f"frozen pass over {examples} {split} examples ({blocks}: {' and '.join(kept)})"


def _shape(base: BaseModel, examples: list[Encoded], what: int | str) -> tuple[int, ...]:
    """The shape of a split's cached outputs: a layer's ``[tokens + 1, hidden]``, or the keys
    and values ``[2, blocks, prompt tokens + 1, heads, head size]`` (a zero row at the end)."""
    if what == KEYS_VALUES:
        prompt_tokens = sum(e.prompt_length for e in examples)
        return (2, base.num_layers, prompt_tokens + 1, *_kv_shape(base.model.config))
    return (sum(len(e.input_ids) for e in examples) + 1, base.hidden_size)


def _nbytes(base: BaseModel, examples: list[Encoded], what: int | str) -> int:
    return math.prod(_shape(base, examples, what)) * _dtype(base, what).itemsize


def _states(layer: int, examples: list[Encoded], flat: torch.Tensor, as_tuple: bool):
    starts = _starts([len(e.input_ids) for e in examples])[0]
    return CachedStates(layer, examples, flat, torch.tensor(starts), as_tuple)


def _keys_values(base: BaseModel, examples: list[Encoded], both: torch.Tensor):
    starts = _starts([e.prompt_length for e in examples])[0]
    argument = kv_argument(base.model.base_model)
    return FrozenKeysValues(examples, both, torch.tensor(starts), argument)


class _SpillFailed(Exception):
    """The spill folder is full or not writable (the cause says why)."""


def _dtype(base: BaseModel, what: int | str) -> torch.dtype:
    """What a cached output is stored in: a layer's hidden states in the residual stream's
    dtype; keys and values, which come out of linear layers, in the matmul one (they differ in
    ``bfloat16-mixed``: see ``models.Precision``)."""
    return base.precision.matmul if what == KEYS_VALUES else base.precision.states


def _kv_shape(config) -> tuple[int, int]:
    """A token's keys (or values) in one block: (heads, head size)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


class _Captured(Exception):
    """Raised by the capture hook to stop a forward once the highest wanted block has run."""


def compute_states(base: BaseModel, layer: int, examples: list[Encoded]) -> CachedStates:
    """Run ``examples`` up to block ``layer`` (not above) and keep its unedited output."""
    return compute_frozen(base, examples, [layer], keys_values=False)[0][0]


@torch.no_grad()
def compute_frozen(
    base: BaseModel,
    examples: list[Encoded],
    layers: list[int],
    keys_values: bool,
    below: CachedStates | None = None,
    allocate: Callable[[int | str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[CachedStates], FrozenKeysValues | None]:
    """One frozen pass over ``examples``: the unedited outputs of each block in ``layers``
    and, with ``keys_values``, every block's keys and values of the prompt tokens (as the
    model caches them: after rotary embeddings). Without keys and values the pass stops at
    the highest of ``layers``, and starts from ``below`` (a lower block's cached outputs)
    when given.

    Each batch's rows are copied into tensors allocated once at their final size: holding
    every batch's outputs until one concatenation at the end took twice the memory.
    ``allocate(what, shape, dtype)`` gives them (``what`` a layer or ``KEYS_VALUES``: memory
    on the model's device, or a memory-mapped file); by default they go to the model's device.
    ``progress`` hears the fraction of the tokens done after each batch."""
    stop_at = None if keys_values else max(layers)

    def padded(what: int | str, dim: int) -> torch.Tensor:
        """An empty tensor to be filled, but for its last slice along ``dim``: zeros, the
        row that padding positions gather."""
        shape, dtype = _shape(base, examples, what), _dtype(base, what)
        if allocate is None:
            tensor = torch.empty(shape, dtype=dtype, device=base.device)
        else:
            tensor = allocate(what, shape, dtype)
        tensor.select(dim, -1).zero_()
        return tensor

    token_starts, total = _starts([len(e.input_ids) for e in examples])
    flat = {layer: padded(layer, 0) for layer in layers}
    as_tuple: dict[int, bool] = {}
    rows: list[int] = []
    lengths: list[int] = []

    def capture(module: nn.Module, args: tuple, output, layer: int) -> None:
        as_tuple[layer] = isinstance(output, tuple)
        hidden = output[0] if as_tuple[layer] else output
        for row, index, length in zip(hidden, rows, lengths, strict=True):
            flat[layer][token_starts[index] : token_starts[index] + length] = row[:length]
        if layer == stop_at:
            raise _Captured

    # prepend: capture before any intervention hook on the same block could edit the output
    handles = [
        base.blocks[layer].register_forward_hook(partial(capture, layer=layer), prepend=True)
        for layer in layers
    ]
    if keys_values:
        argument = kv_argument(base.model.base_model)
        prompt_starts = _starts([e.prompt_length for e in examples])[0]
        both = padded(KEYS_VALUES, 2)
        keys, values = both
    done = 0
    try:
        # right padding, sorted by length: a row's states do not depend on its batch
        for batch in batches(examples, base.tokenizer.pad_token_id, pass_tokens(base.device)):
            batch = batch.to(base.device)
            rows[:] = batch.rows.tolist()
            lengths[:] = batch.attention_mask.sum(-1).tolist()
            replay = below.replaying(base.blocks, batch) if below is not None else nullcontext()
            try:
                with replay:
                    output = base.model.base_model(**batch.model_inputs(), use_cache=keys_values)
            except _Captured:
                pass
            if keys_values:  # per block [rows, heads, T, dim] -> each row's [T, heads, dim]
                for block, (k, v, *_) in enumerate(getattr(output, argument)):
                    for position, index in enumerate(rows):
                        first, length = prompt_starts[index], examples[index].prompt_length
                        span = slice(first, first + length)
                        keys[block, span] = k[position, :, :length].transpose(0, 1)
                        values[block, span] = v[position, :, :length].transpose(0, 1)
            if progress is not None:
                done += sum(lengths)
                progress(done / total)
    finally:
        for handle in handles:
            handle.remove()
    states = [_states(layer, examples, flat[layer], as_tuple[layer]) for layer in layers]
    return states, _keys_values(base, examples, both) if keys_values else None


def _starts(lengths: list[int]) -> tuple[list[int], int]:
    """Where each piece of ``lengths`` starts when the pieces are laid end to end, and their
    total."""
    starts = list(itertools.accumulate(lengths, initial=0))
    return starts[:-1], starts[-1]


def _mapped(folder: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor backed by a new file in ``folder``, unlinked at once: the mapping keeps
    its pages, which go back to the disk when the tensor is freed, even if the process is
    killed (nothing is left behind to clean up)."""
    folder.mkdir(parents=True, exist_ok=True)
    numel = math.prod(shape)
    handle, name = tempfile.mkstemp(prefix="reftsearch-cache-", dir=folder)
    try:
        size = numel * dtype.itemsize
        if hasattr(os, "posix_fallocate"):
            # blocks reserved now: a full disk fails here, not as SIGBUS at a write to the mapping
            os.posix_fallocate(handle, 0, size)
        else:  # macOS: a sparse file
            os.ftruncate(handle, size)
        tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(handle)
        os.unlink(name)
    return tensor.view(shape)
