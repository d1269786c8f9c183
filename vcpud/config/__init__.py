"""The policy config: YAML -> a frozen Config, with every error as FILE:LINE:COL; VM matching.

Modules: model (the frozen values), issues (positioned errors), yamlpos (YAML nodes with
positions), sources (files, includes), fields (schema machinery), cpus, matching, pooldefs,
schema (the keys), loader (whole configs), listen (the listen-address grammar).
"""

from ..discovery import DEFAULT_EXECUTABLES
from .issues import ConfigError, ConfigIssue, Position
from .listen import ListenAddress, ListenAddressError, parse_listen
from .loader import load_config, parse_config_text
from .matching import MAX_UID
from .model import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_RESCAN_INTERVAL,
    DEFAULT_STATE_FILE,
    ON_EXHAUSTED_MODES,
    Config,
    FrozenMap,
    Match,
    Policy,
)
from .schema import MAX_RESCAN_INTERVAL

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_EXECUTABLES",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_RESCAN_INTERVAL",
    "DEFAULT_STATE_FILE",
    "MAX_RESCAN_INTERVAL",
    "MAX_UID",
    "ON_EXHAUSTED_MODES",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "FrozenMap",
    "ListenAddress",
    "ListenAddressError",
    "Match",
    "Policy",
    "Position",
    "load_config",
    "parse_config_text",
    "parse_listen",
]
