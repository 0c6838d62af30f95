"""One writer per output location: a lease object, `_lease.json`, next to the data.

A job takes the lease with an exclusive create (O_EXCL on a disk, `If-None-Match: *` on S3), renews it from a
heartbeat thread while it runs, and removes it at the end. A job that finds the lease held refuses to start and
names the holder. A lease is stale, and is taken over, when

  * its holder ran on this host and that process is gone (a crash or a SIGKILL of the driver), or
  * its last heartbeat is older than its expiry (a holder on another host that died);

the takeover is a compare-and-swap of the exact lease read, so of two jobs that both find it stale only one wins.
`--break-lease` takes a lease over whatever it says: for a holder known to be gone before its expiry runs out.
A holder whose lease was taken from it (it stalled past the expiry) finds out at its next heartbeat and stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from jobs.errors import JobInputError
from jobs.location import Location, LocationError

log = logging.getLogger("invardiff")

LEASE_NAME = "_lease.json"
LEASE_FORMAT = "invardiff-lease/1"
HEARTBEAT_S = float(os.environ.get("INVARDIFF_LEASE_HEARTBEAT_S", "10"))
EXPIRY_S = float(os.environ.get("INVARDIFF_LEASE_EXPIRY_S", "60"))


class LeaseHeldError(JobInputError):
    """Another job holds the output location."""


class Lease:
    def __init__(self, location: Location, document: dict):
        self.location = location
        self._written = _encode(document)
        self.token = document["token"]
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._on_lost = None
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, location: Location, *, command: str, break_lease: bool = False) -> Lease:
        """Take the lease, or raise LeaseHeldError naming the live holder. The first write to the location, so
        it is also the probe that the location is writable (LocationError otherwise)."""
        now = time.time()
        document = {
            "format": LEASE_FORMAT,
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "acquired_at": now,
            "heartbeat_at": now,
            "expiry_s": EXPIRY_S,
        }
        mine = _encode(document)
        location.prepare()
        for _ in range(5):  # each round either wins, refuses, or lost a race that changed what it read
            try:
                if location.create_exclusive(LEASE_NAME, mine):
                    return cls(location, document)
                current = location.read(LEASE_NAME)
            except LocationError:
                raise
            except OSError as e:  # permissions, read-only disk, missing bucket: one line, before any work
                raise LocationError(f"--out {location.uri} is not writable ({_reason(e)})") from None
            if current is None:
                continue  # released between our create and our read
            holder = _decode(current)
            stale = _stale_reason(holder)
            if stale is None and not break_lease:
                raise LeaseHeldError(_held_message(location, holder))
            if location.swap(LEASE_NAME, current, mine):
                log.warning("took over the lease on %s (%s)", location.uri, "--break-lease" if break_lease and
                            stale is None else stale)
                return cls(location, document)
        raise LeaseHeldError(f"--out {location.uri}: the lease keeps changing hands; another job is starting there")

    def keep_alive(self, on_lost=None) -> None:
        """Renew the lease every HEARTBEAT_S seconds until release(); call `on_lost` (once, from the heartbeat
        thread) if another job took it over."""
        self._on_lost = on_lost
        self._thread = threading.Thread(target=self._heartbeat, name="invardiff-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.renew():
                    self.lost.set()
                    log.error("the lease on %s was taken over by another job; stopping", self.location.uri)
                    if self._on_lost is not None:
                        self._on_lost()
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again, expiry is 6 beats
                log.warning("could not renew the lease on %s (%s)", self.location.uri, _reason(e))

    def renew(self) -> bool:
        document = json.loads(self._written)
        document["heartbeat_at"] = time.time()
        renewed = _encode(document)
        if self.location.read(LEASE_NAME) is None:
            # Gone, not taken (an object store that lost its data, a user's rm): take it again, exclusively.
            log.warning("the lease on %s vanished; taking it again", self.location.uri)
            if not self.location.create_exclusive(LEASE_NAME, renewed):
                return False
            self._written = renewed
            return True
        if self.location.local:
            # A rename-aside swap would leave the name free for an instant, and a starting job could take a
            # live lease in that instant. A fresh lease is never taken over, so check, then overwrite in place.
            if self.location.read(LEASE_NAME) != self._written:
                return False
            self.location.replace(LEASE_NAME, renewed)
        elif not self.location.swap(LEASE_NAME, self._written, renewed):
            return False
        self._written = renewed
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 5)
        if self.lost.is_set():
            return
        try:
            current = self.location.read(LEASE_NAME)
            if current is not None and _decode(current).get("token") == self.token:
                self.location.remove(LEASE_NAME)
        except Exception as e:  # noqa: BLE001 - left behind, it is stale (pid gone, or expired) for the next job
            log.warning("could not remove the lease on %s (%s)", self.location.uri, _reason(e))


def _encode(document: dict) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _decode(data: bytes) -> dict:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != LEASE_FORMAT:
            raise ValueError
        return document
    except ValueError:
        # Not ours to interpret: a foreign object named like our lease is left alone and named to the user.
        raise LocationError(f"{LEASE_NAME} is not an invardiff lease; refusing to use this location") from None


def _stale_reason(holder: dict) -> str | None:
    age = time.time() - float(holder.get("heartbeat_at", 0))
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"its holder, pid {holder.get('pid')} on this host, is gone"
    if age > float(holder.get("expiry_s", EXPIRY_S)):
        return f"its last heartbeat was {age:.0f} s ago"
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _held_message(location: Location, holder: dict) -> str:
    started = datetime.fromtimestamp(float(holder.get("acquired_at", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    beat = time.time() - float(holder.get("heartbeat_at", 0))
    return (
        f"--out {location.uri} is being written by another job (pid {holder.get('pid')} on {holder.get('host')}, "
        f"started {started}, last heartbeat {beat:.0f} s ago); wait for it to finish, or if you know it is gone, "
        f"rerun with --break-lease"
    )


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.splitlines()[0] if text else type(e).__name__
