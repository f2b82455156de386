"""CPU threads for torch: how many each worker runs, and how an idle one waits.

torch's CPU kernels run on OpenMP (libgomp). Two of its defaults cost a lot on a machine whose
cores other processes also use (benchmarks/shared_machine.py):

* an OpenMP thread that finishes its share of a kernel spins (up to ~300,000 loops, ~3 ms)
  before it sleeps, waiting for the rest. A reftsearch step is thousands of small kernels (a
  suffix-only trial runs a few tokens per row above the cached layers), each ending in such a
  barrier: when another process holds one of the cores, the thread that still has work waits
  for a time slice while its partner spins on the other core. A step of that shape (15
  SmolLM2-sized layers on 32 rows, forward and backward; 2 cores with 5-8 other helpers'
  processes on them) took 1.5-7.5 s on torch's two spinning threads, 0.4-1.5 s with passive
  waits (threads sleep at once), 1.1-2.8 s on one thread. pyreft's steps (whole rows, every
  layer: big kernels) have far fewer barriers per second: they slowed ~3x where reftsearch
  slowed 20x. Sleeping at once costs a machine to itself, though: each of a step's ~200
  matmuls then wakes its partner thread (tens of microseconds), and the gap between two
  kernels is about as long. A short spin catches the next kernel and still sleeps soon when
  the partner is held off. libgomp counts it in loops of one ``pause`` instruction, whose
  length is the CPU's: 23.5 ns on an AMD EPYC (Zen 5), so 2,000 loops are ~50 us there. On
  that EPYC a whole run of benchmarks/vs_pyreft.py's four configs took 62 s alone against
  70 s passive, and 2.2x that beside a busy 2-thread process (passive 1.7x; 3,000 loops
  2.35x, 5,000 2.52x: over the 2.5x goal). On an Intel Xeon with AMX (``pause``: 19.4 ns) a
  float32 step at layer 15 took 109-119 ms at 1,000-3,000 loops, 100 ms at 5,000 and 124 ms
  passive, but whole runs alone took as long at 2,000 loops as at 5,000 (72 s, three rounds
  each, alternating), and 101 s beside the busy process (5,000 loops: 107 s)
  (benchmarks/README.md). libgomp (torch's OpenMP) reads ``GOMP_SPINCOUNT`` once, when
  torch loads it: it is set at the start of the ``reftsearch`` command and in every Ray
  worker's environment, unless the user set a wait policy of their own. Intel's OpenMP
  (some torch builds) ignores it and sleeps at once (``KMP_BLOCKTIME=0``).
* one thread per core in every process: several workers on one machine would each start one
  per core. ``resources.threads`` (default: ``$OMP_NUM_THREADS`` if set, else the cores this
  process may use divided by the workers on this machine, at least 1) sets it per worker.

No import of torch here: the command line calls ``prefer_short_waits`` before torch loads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from reftsearch.spec.study_file import ResourcesSpec

# what idle OpenMP threads do: spin a little (~50 us on a Zen 5), then sleep (see the
# module's text)
WAIT_POLICY = {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "0"}
# any of these set by the user is their policy: none of ours is added to it
WAIT_SETTINGS = ("OMP_WAIT_POLICY", *WAIT_POLICY)


def wait_settings(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The OpenMP wait settings a process should start with: the user's where ``env`` has
    any, else ``WAIT_POLICY``."""
    given = {key: env[key] for key in WAIT_SETTINGS if key in env}
    return given or dict(WAIT_POLICY)


def prefer_short_waits(env: os._Environ | dict = os.environ) -> None:
    """Put ``wait_settings(env)`` in ``env``. Only takes effect in this process if torch is
    not imported yet (OpenMP reads them when it loads)."""
    env.update(wait_settings(env))


def available_cores() -> int:
    """The cores this process may run on (a container's or ``taskset``'s share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_threads(
    resources: ResourcesSpec,
    workers: int = 1,
    cores: int | None = None,
    env: Mapping[str, str] = os.environ,
) -> int:
    """torch threads for each of ``workers`` workers sharing this machine's ``cores``:
    ``resources.threads``, else ``$OMP_NUM_THREADS`` (a scheduler's or the user's choice),
    else an equal share of the cores (at least 1)."""
    if resources.threads is not None:
        return resources.threads
    from_env = env.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, (cores or available_cores()) // workers)


def cluster_worker_threads(resources: ResourcesSpec, env: Mapping[str, str] = os.environ) -> int:
    """On a Ray cluster that the run joins, actors land on machines this process cannot see:
    each gets the CPUs Ray reserves for it (``cpus_per_trial``, at least 1 thread) unless
    ``resources.threads`` or ``$OMP_NUM_THREADS`` says otherwise."""
    cores = max(1, math.floor(resources.cpus_per_trial))
    return worker_threads(resources, workers=1, cores=cores, env=env)


def worker_env(threads: int, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a Ray worker process starts with: its threads and this process's wait
    settings (set before its torch loads)."""
    return {"OMP_NUM_THREADS": str(threads), **wait_settings(env)}


def use_threads(threads: int) -> None:
    """Make torch in this process run ``threads`` threads (intra-op; reftsearch runs no
    inter-op parallel work)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
