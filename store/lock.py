"""One writer per shard: an exclusive lock file with stale-lock detection by pid."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .schema import ShardLockedError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ShardLock:
    """Context manager holding ``path`` (a lock file) exclusively.

    The file records the holder's host and pid. A lock left by a dead process on this host is stale
    and is taken over; a live holder (or one on another host, which we cannot check) is refused."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is not None and holder.get("host") == me["host"] and not _pid_alive(int(holder["pid"])):
                    self.path.unlink(missing_ok=True)  # stale: its writer died
                    continue
                if holder is None:  # being written right now by the winner of a race
                    raise ShardLockedError(f"{self.what} is being locked by another writer ({self.path})") from None
                raise ShardLockedError(
                    f"{self.what} is already being written by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(lock {self.path}); remove the lock file only if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise ShardLockedError(f"{self.what}: could not take the lock {self.path}")

    def _read_holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and "pid" in data else None

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "ShardLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
