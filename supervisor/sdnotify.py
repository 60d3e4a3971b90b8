"""A tiny sd_notify(3) client: tells systemd about readiness, status, reloads and watchdog pings.

Rules for this module:
- No dependency: the protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX
  socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading '@').
- Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) every call is a no-op.
- Notification is best effort: a failed send never raises (the service must keep serving);
  the first failure is logged as a warning, later ones at debug level.
- Sends never block the event loop: the socket is non-blocking and a full receiver counts
  as a failed send.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SdNotify:
    """One notifier per process. Build it with ``SdNotify.from_env()``."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | None = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> SdNotify:
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        ``unset_environment``: remove those variables afterwards so child processes (the
        worker) do not inherit them and talk to systemd on our behalf.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or None
        address: str | None = None
        if raw is not None:
            if raw.startswith("@"):
                # Abstract namespace socket: the leading '@' stands for a NUL byte.
                address = "\0" + raw[1:]
            elif raw.startswith("/"):
                address = raw
            else:
                # e.g. "vsock:2:1234" (systemd >= 253 in VMs): not supported here.
                log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; systemd notifications are off", raw)
        watchdog = _watchdog_usec(env)
        if unset_environment:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """The watchdog period systemd expects (``WatchdogSec=``), in seconds, or None when the
        watchdog is off or meant for another process. Ping at least every half of it."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    # --- messages -------------------------------------------------------------------

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram. True if sent; never raises."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            shown = self._address.replace("\0", "@")
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd at %s: %s (further failures logged at debug level)", shown, exc
                )
            else:
                log.debug("cannot notify systemd at %s: %s", shown, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(_status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 (Type=notify-reload) requires MONOTONIC_USEC with RELOADING=1 to
        # match the reload to its READY=1; older systemd ignores the extra field.
        fields = ["RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, usec: int) -> bool:
        """Ask systemd for ``usec`` more microseconds for the current start/stop/reload job."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_field(text: str) -> str:
    # One datagram field is one line: a newline would start a bogus field.
    return "STATUS=" + " ".join(text.splitlines())


def _watchdog_usec(env: MutableMapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd watches; if it is another one (we were started by
    # a wrapper that did not unset it), the pings are not ours to send.
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; systemd watchdog pings are off", raw)
        return None
    return usec if usec > 0 else None
