"""The live dashboard: `GET /v1/energy/stream` (SSE snapshots) and `GET /dashboard` (one page)."""

from proxy.dashboard.stream import EnergyStream, page_html, parse_interval_s

__all__ = ["EnergyStream", "page_html", "parse_interval_s"]
