"""``reftsearch dashboard``: optuna-dashboard on a study's storage, bound to localhost by default.

The dashboard reads the same storage the workers write, so a study can be watched while it
runs. It has no login: anyone who can reach the port can read the study and write notes, so
it listens on 127.0.0.1 unless told otherwise (reach a remote one through an SSH tunnel, see
dashboards/README.md). The URL is printed only once the port is bound, so a script can wait
for that line and then talk to the server.
"""

from __future__ import annotations

from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore

from reftsearch.errors import BadInputError
from reftsearch.progress import Log
from reftsearch.search.kept_weights import weights_folder
from reftsearch.search.storage import mask_url, open_existing_storage

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection must not keep Ctrl-C waiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per request is noise here
        pass


def study_url(host: str, port: int, study_id: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}/dashboard"
    return f"{base}/studies/{study_id}" if study_id is not None else base


def serve(
    study_name: str,
    storage_url: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Log = print,
) -> None:
    """Serve the dashboard until interrupted (Ctrl-C). The storage must exist: a mistyped
    SQLite path is refused, not created."""
    storage = open_existing_storage(storage_url, study_name)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        study_id = None
    app = optuna_dashboard.wsgi(storage, artifact_store=_weights_store(storage, study_id))
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as err:
        raise BadInputError(f"--host {host} --port {port}: cannot listen there ({err})") from None
    where = f"study {study_name!r}" if study_id is not None else "its storage (no study yet)"
    log(f"optuna-dashboard for {where} on {mask_url(storage_url)}")
    if host not in LOCAL_HOSTS:
        log(
            f"warning: listening on {host}: the dashboard has no login, anyone who can reach "
            "this port can read the study and edit its notes"
        )
    log(f"open {study_url(host, server.server_port, study_id)}  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("dashboard stopped")
    finally:
        server.server_close()


def _weights_store(
    storage: optuna.storages.BaseStorage, study_id: int | None
) -> FileSystemArtifactStore | None:
    """The study's kept trial weights (reftsearch.search.kept_weights), listed on each
    trial's page."""
    if study_id is None:
        return None
    folder = weights_folder(storage, study_id)
    return FileSystemArtifactStore(str(folder)) if folder and folder.is_dir() else None
