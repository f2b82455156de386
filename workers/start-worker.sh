#!/usr/bin/env bash
# Join a study as one more worker, without Ray (SLURM, plain VMs, a Kubernetes Job).
#
#   REFTSEARCH_STORAGE=postgresql+psycopg://user:pass@db:5432/studies \
#       workers/start-worker.sh STUDY_NAME [--n-trials N]
#
# The storage URL comes from the environment, not the command line, so the password does not
# show in `ps`. The study must exist: `reftsearch run STUDY.yaml` creates it and publishes its
# spec and budget; the worker stops when the budget is met.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: REFTSEARCH_STORAGE=URL $0 STUDY_NAME [--n-trials N]" >&2
    exit 2
fi
: "${REFTSEARCH_STORAGE:?set REFTSEARCH_STORAGE to the storage URL of the study}"
study="$1"
shift
# one torch thread per CPU given to this worker (default 1; the study's resources.threads wins):
# oversubscribed threads are slow. reftsearch sets OMP_WAIT_POLICY=PASSIVE itself.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m reftsearch.cli worker --study "$study" "$@"
