"""Run outputs: ``metrics.jsonl``, ``config.json``, ``summary.json`` and ``report.png``.

matplotlib is imported only inside :func:`plot_report`, so importing this package stays light.
"""

from fedq.report.metrics import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsWriter,
    read_metrics,
    to_json_value,
    write_config,
    write_summary,
)
from fedq.report.plots import cumulative_wire_bytes, plot_report
from fedq.report.summary import SUMMARY_KEYS, summarize

REPORT_FILE = "report.png"

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "SUMMARY_FILE",
    "SUMMARY_KEYS",
    "MetricsWriter",
    "cumulative_wire_bytes",
    "plot_report",
    "read_metrics",
    "summarize",
    "to_json_value",
    "write_config",
    "write_summary",
]
