"""One writer per shard: an exclusive lock file with stale-lock detection by pid."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path

from .schema import ShardLockedError

log = logging.getLogger("lt_distill.store")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ShardLock:
    """Context manager holding ``path`` (a lock file) exclusively.

    The file records the holder's host and pid. It is written whole before it appears (written to a
    private file, then hard-linked into place, which fails if the lock exists), so a lock that is empty or
    unreadable was never finished (disk full, a crash) and is stale, like one left by a dead process on
    this host: both are taken over with a warning. A live holder (or one on another host, which we cannot
    check) is refused."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(3):
            if self._try_take(me):
                self._held = True
                return
            holder = self._read_holder()
            if holder is not None and holder.get("gone"):  # released meanwhile: try again
                continue
            if holder is None:
                log.warning("taking over the stale lock %s of %s: it is empty or unreadable (its writer "
                            "died before finishing it, e.g. on a full disk)", self.path, self.what)
                self.path.unlink(missing_ok=True)
                continue
            if holder.get("host") == me["host"] and not pid_alive(int(holder["pid"])):
                log.warning("taking over the stale lock %s of %s: pid %s has exited", self.path, self.what,
                            holder["pid"])
                self.path.unlink(missing_ok=True)  # stale: its writer died
                continue
            raise ShardLockedError(
                f"{self.what} is already being written by pid {holder.get('pid')} on {holder.get('host')} "
                f"(lock {self.path}); remove the lock file only if that process is gone")
        raise ShardLockedError(f"{self.what}: could not take the lock {self.path}")

    def _try_take(self, me: dict) -> bool:
        """Publish a complete lock file at ``path``; False when one exists already."""
        private = self.path.with_name(f"{self.path.name}.{me['pid']}.{uuid.uuid4().hex[:8]}")
        try:
            private.write_text(json.dumps(me))
            try:
                os.link(private, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            private.unlink(missing_ok=True)

    def _read_holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8") or "null")
        except FileNotFoundError:
            return {"host": None, "pid": -1, "gone": True}
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            return data
        return None

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "ShardLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
