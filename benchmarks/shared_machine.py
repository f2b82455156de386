"""A run beside another busy process on the same cores: how much slower it gets.

On a small machine shared with other jobs, torch's OpenMP threads spin-wait at the end of
every kernel for partners that another process holds off the cores; reftsearch's steps are
many small kernels (reftsearch.engine.threads), so that cost it 5-20x where pyreft's big
kernels lost ~3x. reftsearch therefore runs with a short spin (``GOMP_SPINCOUNT=2000``, set
before torch loads) and ``resources.threads`` per worker.

The run: ``reftsearch run`` on benchmarks/vs_pyreft.py's configs and rows (SmolLM2, last-token
LoReFT, one epoch, float32; ``--quick``: two configs, 128 train and 64 dev rows), once alone
and once while a second process multiplies 512x512 matrices on two torch threads (torch's
defaults) until the run ends. ``--torch-defaults`` adds the same two runs with torch's own
settings (torch imported before reftsearch sets the wait policy), for comparison. Usage::

    .venv/bin/python benchmarks/shared_machine.py [--quick] [--torch-defaults]

Last line: ``shared_machine_slowdown=X.XX`` (the run beside the busy process / alone, with
reftsearch's settings; goal <= 2.5).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import run_reftsearch, study_yaml, write_data
from vs_pyreft import CONFIGS

from reftsearch.engine.threads import WAIT_SETTINGS

BUSY = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(512, 512)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
# `reftsearch` with torch loaded first: OpenMP keeps its default (spinning) waits
TORCH_DEFAULTS = [
    sys.executable,
    "-c",
    "import sys, torch; from reftsearch.cli import main; sys.exit(main(sys.argv[1:]))",
]


def busy_process() -> subprocess.Popen:
    """Another user's torch job: two threads, torch's defaults (no wait policy of ours)."""
    ours = ("OMP_NUM_THREADS", *WAIT_SETTINGS)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    process = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    time.sleep(5)  # its imports done: busy from the run's first second
    return process


def timed_run(folder: Path, train: Path, dev: Path, configs, busy: bool, command=None) -> float:
    folder.mkdir()
    study = study_yaml(folder, train, dev, configs, "float32")
    other = busy_process() if busy else None
    try:
        result = run_reftsearch(study, configs, command)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return result["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configs, 128 train / 64 dev rows")
    parser.add_argument(
        "--torch-defaults", action="store_true", help="also run with torch's own settings"
    )
    args = parser.parse_args()
    configs = CONFIGS[:2] if args.quick else CONFIGS
    n_train, n_dev = (128, 64) if args.quick else (512, 256)
    arms = [("reftsearch's settings", None)]
    if args.torch_defaults:
        arms.append(("torch's defaults", TORCH_DEFAULTS))
    from reftsearch.models.base import load_base_model

    load_base_model("embedded:smollm2", "causal_lm")  # converts the GGUF once per machine
    print(
        f"{len(configs)} configs, 1 epoch over {n_train} SST-2 rows, {n_dev} dev; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before",
        flush=True,
    )
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, dev = write_data(folder, n_train, n_dev)
        for index, (name, command) in enumerate(arms):
            alone = timed_run(folder / f"{index}-alone", train, dev, configs, False, command)
            print(f"{name}: alone {alone:.1f}s", flush=True)
            busy = timed_run(folder / f"{index}-busy", train, dev, configs, True, command)
            ratios[name] = busy / alone
            print(
                f"{name}: beside a 2-thread busy process {busy:.1f}s ({ratios[name]:.2f}x); "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    print(f"shared_machine_slowdown={ratios[arms[0][0]]:.2f}")


if __name__ == "__main__":
    main()
