"""reftsearch: automatic search for the best ReFT intervention configuration."""

import warnings

__version__ = "0.1.0"

# Heartbeats, stale-trial retries and metric names are Optuna APIs reftsearch relies on by
# design; their ExperimentalWarning, repeated at every call, tells its users nothing. Matched
# by its text: importing optuna for its class cost every command ~0.7 s, `validate` included.
EXPERIMENTAL = r".* is experimental \(supported from v|Argument ``\w+`` is an experimental feature"
warnings.filterwarnings("ignore", message=EXPERIMENTAL, module=r"reftsearch\.")
