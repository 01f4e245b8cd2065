"""Alerts of the live daemon: de-duplication, sinks and the durable spool.

See ``docs/alerts.md``.  The daemon only needs :class:`Alerter`::

    alerter = Alerter(config.alerts, sensor=config.sensor_name, metrics=metrics)
    alerter.observe(record, interface="eth0", now_ns=time.time_ns())  # per decided flow
    alerter.close(timeout=5.0)                                          # on shutdown
"""

from __future__ import annotations

from .alerter import Alerter, build_sinks
from .alertmanager import AlertmanagerSink, DeliveryError, alert_payload
from .dedup import Action, Deduplicator, GroupKey, Outcome, remote_network, should_alert
from .sinks import (
    AlertRejected,
    JsonlSink,
    Sink,
    SyslogSink,
    alert_json,
    alert_line,
    syslog_message,
)
from .spool import Spool, SpoolOptions, decode_alert, encode_alert

__all__ = [
    "Action",
    "AlertRejected",
    "Alerter",
    "AlertmanagerSink",
    "Deduplicator",
    "DeliveryError",
    "GroupKey",
    "JsonlSink",
    "Outcome",
    "Sink",
    "Spool",
    "SpoolOptions",
    "SyslogSink",
    "alert_json",
    "alert_line",
    "alert_payload",
    "build_sinks",
    "decode_alert",
    "encode_alert",
    "remote_network",
    "should_alert",
    "syslog_message",
]
