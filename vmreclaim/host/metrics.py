"""Prometheus metrics of the host daemon (prometheus-client, its own registry).

The counters are the ones ``vmreclaim status`` shows, per VM and disk, plus the
delete-to-freed latency: the time from when a record reached the host to when the
reclaim that handled it finished (the guest's own delay before sending is not seen by
the host; the benchmark measures that end to end). Served over HTTP only when
``metrics: {port: N}`` is configured.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Delete-to-freed buckets, seconds: from a fast fence to a batch policy's hour.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
FENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class HostMetrics:
    """Every metric the daemon exports; one instance per daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        disk = ("vm", "disk")
        self.records = Counter("vmreclaim_records_received", "Deletion records stored", disk, registry=r)
        self.ranges = Counter("vmreclaim_ranges_received", "Byte ranges in stored records", disk, registry=r)
        self.deleted_bytes = Counter(
            "vmreclaim_deleted_bytes_received", "Bytes reported deleted in stored records", disk, registry=r
        )
        self.rejected = Counter(
            "vmreclaim_records_rejected", "Messages from guests that were refused", ("vm", "kind"), registry=r
        )
        self.pending = Gauge("vmreclaim_pending_bytes", "Bytes waiting to be reclaimed", disk, registry=r)
        self.requested = Counter(
            "vmreclaim_requested_bytes", "Bytes reclaims were asked to free", disk, registry=r
        )
        self.punched = Counter(
            "vmreclaim_punched_bytes", "Bytes punched (or trimmed by the guest)", disk, registry=r
        )
        self.freed = Counter(
            "vmreclaim_freed_bytes", "Allocated bytes of image files actually freed", disk, registry=r
        )
        self.reclaims = Counter(
            "vmreclaim_reclaims", "Reclaim attempts", ("vm", "disk", "mode", "outcome"), registry=r
        )
        self.last_reclaim = Gauge(
            "vmreclaim_last_reclaim_timestamp_seconds", "Unix time of the last reclaim", disk, registry=r
        )
        self.latency = Histogram(
            "vmreclaim_delete_to_freed_seconds",
            "Time from a record's arrival to the end of the reclaim that handled it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fence_seconds = Histogram(
            "vmreclaim_fence_seconds",
            "Time a guest filesystem stayed frozen for a host punch (request to release)",
            buckets=FENCE_BUCKETS,
            registry=r,
        )
        self.agents = Gauge("vmreclaim_agents_connected", "Agents connected", registry=r)
        self.commits = Counter("vmreclaim_ingest_commits", "Database transactions of records", registry=r)
        self.threshold = Gauge(
            "vmreclaim_policy_threshold", "The threshold policy's current threshold (if any)", registry=r
        )
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int, address: str) -> int:
        """Start the HTTP endpoint; returns the bound port (``port: 0`` picks one)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
