"""Frozen passes kept on disk: shared by the processes of one machine and by later runs.

A frozen pass (``reftsearch.engine.activation_cache``) depends only on the model (its weights,
config and precision, the device kind and library versions that compute it), the tokenized
split, and what it keeps: a layer's block outputs, or every block's keys and values. Written
here under a key that hashes all of them, it is computed once: another worker, a resumed or
rerun study, or another study on the same model and data maps the file instead.

A file is written under a temporary name and renamed into place, so a reader never sees half
of one and two writers of one entry each write a whole one. It ends with a checksum: a
truncated or damaged file is recomputed, not trusted. Readers map it privately (the workers of
one machine share its pages). One process at a time computes passes over a given split (an
advisory lock): the others wait, then read its files. Past the size budget the least recently
used files go, only ever files named as this store names them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import socket
import struct
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from reftsearch.data.batches import Encoded
from reftsearch.models.packed_linear import linear_kernels
from reftsearch.processes import running

FORMAT = 1  # part of every key: a change in what a file holds must not read old files
MAGIC = b"RSFROZE1"
TRAILER = struct.Struct("<Q8s")  # the metadata's length, then MAGIC: the file's last bytes
ENTRY = re.compile(r"[0-9a-f]{64}\.frozen")
TEMPORARY = re.compile(r"[0-9a-f]{64}\.(?P<host>.+)\.(?P<pid>[0-9]+)\.tmp")
CHUNK = 64 * 2**20  # bytes checksummed at a time

# per model: the device it was hashed on, and its key (a model moved is another model here)
_model_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Pending:
    """An entry being written: ``tensor`` maps the temporary file it is computed into."""

    key: str
    path: Path
    tensor: torch.Tensor


class FrozenStore:
    """Entries in ``folder``, at most ``budget_mb`` of them (least recently used out)."""

    def __init__(self, folder: Path, budget_mb: float) -> None:
        self.folder = Path(folder)
        self.budget_bytes = int(budget_mb * 2**20)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.frozen"

    def load(
        self, key: str, shape: Sequence[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict] | None:
        """The entry ``key`` mapped (copy-on-write: the file never changes), with the
        metadata it was committed with; None when there is none or it is damaged."""
        path = self.path(key)
        data_bytes = math.prod(shape) * dtype.itemsize
        try:
            meta = _read_trailer(path, data_bytes)
            problem = _mismatch(meta, key, shape, dtype)
            if problem is None:
                tensor = torch.from_file(str(path), False, math.prod(shape), dtype=dtype)
                tensor = tensor.view(tuple(shape))
                if _checksum(tensor) != meta["crc32"]:
                    problem = "its checksum does not match its data"
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RuntimeError) as err:
            problem = str(err)
        if problem is not None:
            message = f"frozen store: {path} is damaged ({problem}): computed again"
            warnings.warn(message, stacklevel=2)
            path.unlink(missing_ok=True)  # named as this store names its files: its own
            return None
        os.utime(path)  # least recently used goes first: this one was used now
        return tensor, meta["meta"]

    def create(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> Pending | None:
        """An uninitialised CPU tensor backed by a temporary file of the store, to be filled
        and then ``commit``-ed; None when it alone exceeds the budget.
        Raises OSError when the folder is not writable or the disk is full."""
        size = math.prod(shape) * dtype.itemsize
        if size > self.budget_bytes:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.{socket.gethostname()}.{os.getpid()}.tmp"
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                # blocks reserved now: a full disk fails here, not as SIGBUS at a write
                os.posix_fallocate(handle, 0, size)
            else:  # macOS: a sparse file
                os.ftruncate(handle, size)
        except OSError:
            os.close(handle)
            path.unlink(missing_ok=True)
            raise
        os.close(handle)
        tensor = torch.from_file(str(path), True, math.prod(shape), dtype=dtype)
        return Pending(key, path, tensor.view(tuple(shape)))

    def commit(self, pending: Pending, meta: dict) -> None:
        """Seal ``pending`` (metadata and checksum after its data) and move it into place,
        then drop the least recently used entries past the budget."""
        tensor = pending.tensor
        trailer = {
            "key": pending.key,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype),
            "crc32": _checksum(tensor),
            "meta": meta,
        }
        encoded = json.dumps(trailer).encode()
        with open(pending.path, "r+b") as file:
            file.seek(tensor.numel() * tensor.element_size())
            file.write(encoded + TRAILER.pack(len(encoded), MAGIC))
        os.replace(pending.path, self.path(pending.key))
        self.evict()

    def discard(self, pending: Pending) -> None:
        pending.path.unlink(missing_ok=True)

    def save(self, key: str, tensor: torch.Tensor, meta: dict) -> None:
        """Store a copy of ``tensor`` (one computed elsewhere: on a GPU)."""
        pending = self.create(key, tensor.shape, tensor.dtype)
        if pending is None:
            return
        try:
            pending.tensor.copy_(tensor)
            self.commit(pending, meta)
        except BaseException:
            self.discard(pending)
            raise

    @contextmanager
    def computing(self, key: str, on_wait: Callable[[], None]) -> Iterator[None]:
        """Held while this process computes passes under ``key`` (a split of a model): another
        process that wants them waits (``on_wait`` is called first) and then reads them. The
        lock goes with the process, if it dies."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{key}.lock", "a+b") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)

    def evict(self) -> None:
        """Remove the least recently used entries until the folder's entries and pending
        files fit the budget, and the temporary files of processes of this host that died."""
        host = socket.gethostname()
        entries, used = [], 0
        for path in self.folder.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process removed it meanwhile
                continue
            temporary = TEMPORARY.fullmatch(path.name)
            if temporary and temporary["host"] == host and not running(int(temporary["pid"])):
                path.unlink(missing_ok=True)
            elif temporary:
                used += stat.st_size
            elif ENTRY.fullmatch(path.name):
                used += stat.st_size
                entries.append((stat.st_mtime, stat.st_size, path))
        for _, size, path in sorted(entries):
            if used <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            used -= size


def model_key(base) -> str | None:
    """What identifies a frozen pass's model: the weights and buffers of the model body (not
    the head's, which trials reset and train), its config (label names aside), precision,
    device kind, linear kernels and the library versions; None for a model without its weights
    (``drop_weights``)."""
    model = base.model
    if model in _model_keys and _model_keys[model][0] == base.device:
        return _model_keys[model][1]
    body = model.base_model
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LABEL_KEYS}
    device = base.device.type
    if device == "cuda":
        device = torch.cuda.get_device_name(base.device)
    header = [
        FORMAT,
        type(body).__name__,
        config,
        getattr(model.config, "_attn_implementation", None),
        base.dtype,
        device,
        linear_kernels(model),
        torch.__version__,
        transformers.__version__,
    ]
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    # BERT's pooler sits in the body but is the head's (reset and trained by every trial)
    head = (
        set()
        if base.head is None
        else {id(t) for t in [*base.head.parameters(), *base.head.buffers()]}
    )
    for name, tensor in [*body.named_parameters(), *body.named_buffers()]:
        if id(tensor) in head:
            continue
        if tensor.device.type == "meta":
            return None
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_bytes(tensor.detach().cpu().contiguous()))
    key = digest.hexdigest()
    _model_keys[model] = (base.device, key)  # hashed once per process (~1 s for SmolLM2)
    return key


_LABEL_KEYS = ("id2label", "label2id", "_name_or_path")


def examples_key(examples: list[Encoded]) -> str:
    """What identifies a split's frozen pass: each example's token ids, token types and
    prompt length (what the pass reads)."""
    digest = hashlib.sha256()
    for example in examples:
        row = [example.input_ids, example.prompt_length, example.token_type_ids]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def entry_key(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _checksum(tensor: torch.Tensor) -> int:
    data = _bytes(tensor)
    crc = 0
    for start in range(0, len(data), CHUNK):
        crc = zlib.crc32(data[start : start + CHUNK], crc)
    return crc


def _read_trailer(path: Path, data_bytes: int) -> dict:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < data_bytes + TRAILER.size:
            raise ValueError(f"{size} bytes, fewer than the {data_bytes} of its data")
        file.seek(size - TRAILER.size)
        length, magic = TRAILER.unpack(file.read(TRAILER.size))
        if magic != MAGIC or size != data_bytes + length + TRAILER.size:
            raise ValueError(f"{size} bytes, not a whole entry of {data_bytes} bytes of data")
        file.seek(data_bytes)
        return json.loads(file.read(length))


def _mismatch(meta: dict, key: str, shape: Sequence[int], dtype: torch.dtype) -> str | None:
    want = {"key": key, "shape": list(shape), "dtype": str(dtype)}
    got = {name: meta.get(name) for name in want}
    return None if got == want else f"it holds {got}, not {want}"
