"""reftsearch: automatic search for the best ReFT intervention configuration."""

import warnings

from optuna.exceptions import ExperimentalWarning

__version__ = "0.1.0"

# Heartbeats, stale-trial retries and metric names are Optuna APIs reftsearch relies on by
# design; their ExperimentalWarning, repeated at every call, tells its users nothing.
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=r"reftsearch\.")
