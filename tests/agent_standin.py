"""A membridge agent's fleet-management side on a loopback port, for tests.

Speaks what the agent (v0.4.0) serves the control plane for managing it:
``GET /health`` without a key; ``POST /self-update``, ``/restart`` and
``/uninstall`` only with the right ``X-MEMBRIDGE-AGENT`` (401 otherwise, 500 when
the agent has no key of its own), and only with process control allowed (403
otherwise). A self-update moves the version /health reports. Everything else
(recording, failure injection, ``refuse()``) is ``MembridgeServer``'s.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

from .membridge_server import MembridgeServer, Recorded

UNAUTHORIZED = {"detail": "Unauthorized — invalid or missing X-MEMBRIDGE-AGENT header"}
NO_PROCESS_CONTROL = {"detail": "Process control is disabled. Set MEMBRIDGE_ALLOW_PROCESS_CONTROL=1 to enable."}


class AgentStandIn(MembridgeServer):
    def __init__(self, agent_key: str | None, *, version: str = "0.4.0", node_id: str = "node-a",
                 allow_process_control: bool = True) -> None:
        super().__init__()
        self.agent_key = agent_key
        self.version = version
        self.next_version = "0.4.1"
        self.node_id = node_id
        self.allow_process_control = allow_process_control
        self._current = threading.local()  # the request this handler thread is answering

    def _record(self, entry: Recorded) -> None:
        self._current.entry = entry
        super()._record(entry)

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/health":
            return 200, {
                "status": "ok", "service": "membridge-agent", "version": self.version, "hostname": self.node_id,
                "node_id": self.node_id, "os_info": f"{self.node_id} / Debian GNU/Linux 12 (bookworm)",
                "arch": "aarch64", "init_system": "systemd", "uptime_seconds": 12.5,
                "disk": {"total_gb": 29.1, "free_gb": 17.4, "used_pct": 40.2},
                "capabilities": {"self_update": True, "restart": True, "uninstall": True},
                "steps": ["nested lists are not shown"],
            }
        if method != "POST" or path not in ("/self-update", "/restart", "/uninstall"):
            return 404, {"detail": "Not Found"}
        if not self.agent_key:
            return 500, {"detail": "MEMBRIDGE_AGENT_KEY not configured on agent"}
        given = self._current.entry.headers.get("X-MEMBRIDGE-AGENT", "")
        if not given or not hmac.compare_digest(given.encode(), self.agent_key.encode()):
            return 401, UNAUTHORIZED
        if not self.allow_process_control:
            return 403, NO_PROCESS_CONTROL
        if path == "/self-update":
            self.version = self.next_version
            return 200, {"ok": True, "version": self.version, "new_commit": "abc1234",
                         "steps": [{"step": "pull", "ok": True}, {"step": "restart", "ok": True}],
                         "detail": "Self-update completed"}
        if path == "/restart":
            return 200, {"ok": True, "init_system": "systemd", "service": "membridge-agent",
                         "detail": "Service restart completed"}
        return 200, {"ok": True, "node_id": self.node_id, "init_system": "systemd",
                     "steps": [{"step": "stop_service", "ok": True}],
                     "detail": "Agent uninstalled (service stopped and disabled)"}
