"""Reading the YAML file that holds the policy and the daemon's settings.

One file serves both commands: ``egressd audit --policy FILE`` reads only the
policy keys (:func:`load_policy`; the daemon keys may be present and are not
checked), ``egressd run --config FILE`` reads everything (:func:`load_config`).
Every key is described in ``docs/configuration.md``.

The file is data: it is parsed with YAML's safe loader into plain nodes,
nothing in it is ever run or turned into a Python object of its choosing.
Every problem is reported as a :class:`ConfigError` whose text is one line,
``FILE:LINE: KEY.PATH: VALUE: what was expected``, for example::

    policy.yaml:14: routes[0].to.countries[1]: 'UK' is not an ISO 3166-1 alpha-2
    country code (use GB for the United Kingdom)

(one line in reality), so that an operator (or an editor) can jump straight to the line.  Only the
first problem, in file order, is reported.

The package is split by concern: :mod:`~egressd.config.yaml_doc` reads the
YAML safely and defines :class:`ConfigError`, :mod:`~egressd.config.values`
checks single values, :mod:`~egressd.config.models` lists the keys and their
defaults, :mod:`~egressd.config.errors` turns a failed check into one line, and
:mod:`~egressd.config.build` checks the file as a whole and builds the policy.
"""

from __future__ import annotations

from egressd.config.build import load_config, load_policy, parse_config, parse_policy
from egressd.config.models import (
    AlertsConfig,
    Config,
    FlowsConfig,
    GeoIPConfig,
    IdleTimeouts,
    MetricsConfig,
    NamesConfig,
)
from egressd.config.values import split_host_port
from egressd.config.yaml_doc import (
    MAX_ALIASES,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    NO_VALUE,
    ConfigError,
    format_key_path,
)

__all__ = [
    "MAX_ALIASES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "NO_VALUE",
    "AlertsConfig",
    "Config",
    "ConfigError",
    "FlowsConfig",
    "GeoIPConfig",
    "IdleTimeouts",
    "MetricsConfig",
    "NamesConfig",
    "format_key_path",
    "load_config",
    "load_policy",
    "parse_config",
    "parse_policy",
    "split_host_port",
]
