"""The disk tier of the prompt cache: sequence states that outlive the worker process.

Rules for this module:
- An entry is one file: a header (magic, the settings key, the tokens it covers, a
  SHA-256 of key + tokens + state) and the state bytes as ``llama_state_seq_get_data``
  wrote them. It is restored only by a worker whose key is the same (``settings_key``:
  the model file's identity, the context per sequence, the KV layout, llama.cpp's
  version); a worker with another key keeps its entries in another directory.
- Files are written to a temporary name and renamed (atomic: two workers of the same
  model never see half a file). A file that is truncated, corrupted or foreign is
  skipped with one warning and deleted; it never reaches llama.cpp.
- The byte budget holds for the files of this key; the least recently used go first
  (recency is the file's mtime, touched on every hit, so it survives restarts). An optional
  budget for every model together (``shared_root``/``shared_budget``: the cache dir that
  holds each model's directory) is kept the same way across models: the least recently
  used state of any model goes first. Another worker's file deleted under it is just a
  miss for that worker (a read finds it gone and forgets it).
- Any disk error (full, read-only, gone) turns the tier off with one warning: the worker
  goes on with its RAM cache. A directory another user can write to is never used.
- Nothing here runs on the batch loop thread: ``CacheIO``'s thread writes, reads and
  evicts; the loop only hands it states (``keep``) and takes loaded ones from it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import logging
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.engine.ramcache import RamCache
from worker.engine.slots import common_prefix

log = logging.getLogger("worker")

MAGIC = b"VLKV\x01\n"
_HEAD = struct.Struct("<6s32sIQ32s")  # magic, key, n_tokens, state bytes, sha256
_SUFFIX = ".kv"
# Shortest prefix worth reading a file for (a shared BOS and template head are not).
MIN_DISK_REUSE = 16
_QUEUE = 16  # states waiting to be written; more are dropped (the cache is best effort)


def settings_key(
    model_path: str, n_ctx: int, flash_attn: str, llama_version: str, type_k: str = "f16", type_v: str = "f16"
) -> bytes:
    """What makes a saved state reusable, as 32 bytes. Two workers with the same key can
    restore each other's states; any change here (another model file, even rewritten in
    place, another context size or KV layout, another llama.cpp) gives another key."""
    st = os.stat(model_path)
    ident = "|".join(
        map(str, (os.path.realpath(model_path), st.st_size, st.st_mtime_ns, n_ctx, flash_attn, type_k, type_v,
                  llama_version))
    )
    return hashlib.sha256(ident.encode()).digest()


class UnsafeDirectory(Exception):
    pass


def checked_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; refuse one that another user can write to (they
    could plant states that become our answers) or that is not ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid != os.geteuid():
            raise UnsafeDirectory(f"{p} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeDirectory(f"{p} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")
    return path


@dataclass
class DiskEntry:
    tokens: list[int]
    path: Path
    size: int
    used: float  # mtime_ns: recency


@dataclass
class DiskStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0  # requests served from a state read from disk
    tokens_saved: int = 0  # prompt tokens those requests did not evaluate again
    writes: int = 0
    errors: int = 0  # corrupted files dropped, failed writes


def encode(key: bytes, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """The header and token block of an entry (the state bytes follow them)."""
    toks = array.array("I", tokens).tobytes()
    digest = hashlib.sha256(key + toks)
    digest.update(data)
    return _HEAD.pack(MAGIC, key, len(tokens), len(data), digest.digest()), toks


def read_head(f: object, key: bytes) -> tuple[list[int], int, bytes] | None:
    """(tokens, state length, digest) of an open entry file, or None when it is not one of
    this key's (foreign, another version, truncated)."""
    raw = f.read(_HEAD.size)  # type: ignore[attr-defined]
    if len(raw) != _HEAD.size:
        return None
    magic, fkey, n, size, digest = _HEAD.unpack(raw)
    if magic != MAGIC or fkey != key:
        return None
    toks = f.read(4 * n)  # type: ignore[attr-defined]
    if len(toks) != 4 * n:
        return None
    return array.array("I", toks).tolist(), size, digest


class DiskCache:
    """The entries of one settings key in one directory. Thread-safe (one lock)."""

    def __init__(
        self, directory: Path, key: bytes, budget_bytes: int, shared_root: Path | None = None, shared_budget: int = 0
    ) -> None:
        self.dir = directory
        self.key = key
        self.budget = budget_bytes
        self.shared_root = shared_root
        self.shared_budget = shared_budget
        self.stats = DiskStats()
        self.writable = True
        self._lock = threading.Lock()
        self._entries: dict[str, DiskEntry] = {}

    # --- index -------------------------------------------------------------------------

    def scan(self) -> None:
        """Index the entries already on disk (headers only); drop what is not ours."""
        for p in sorted(self.dir.glob(f"*{_SUFFIX}")):
            try:
                with open(p, "rb") as f:
                    head = read_head(f, self.key)
                st = p.stat()
            except OSError:
                continue
            if head is None or st.st_size != _HEAD.size + 4 * len(head[0]) + head[1]:
                self._drop_bad(p, "not a complete state of this model and settings")
                continue
            with self._lock:
                self._entries[p.name] = DiskEntry(head[0], p, st.st_size, st.st_mtime_ns)
        for p in self.dir.glob("*.tmp"):  # a write that a killed worker left half done
            with contextlib.suppress(OSError):
                p.unlink()
        with self._lock:
            self._evict_locked()
            self._count_locked()

    def best(self, head: Sequence[int]) -> tuple[int, DiskEntry] | None:
        """The entry sharing the longest prefix with ``head``, and that length."""
        found: tuple[int, DiskEntry] | None = None
        with self._lock:
            for e in self._entries.values():
                n = common_prefix(e.tokens, head)
                if n >= MIN_DISK_REUSE and (found is None or n > found[0]):
                    found = (n, e)
        return found

    def holds(self, tokens: Sequence[int]) -> bool:
        """True when an entry already covers all of ``tokens``."""
        with self._lock:
            return any(common_prefix(e.tokens, tokens) == len(tokens) for e in self._entries.values())

    # --- files (the cache thread) ----------------------------------------------------

    def load(self, entry: DiskEntry) -> bytearray | None:
        """The entry's state, checked against its digest; None (and the file deleted) when
        it is damaged or gone."""
        try:
            with open(entry.path, "rb") as f:
                head = read_head(f, self.key)
                if head is None:
                    raise ValueError("bad header")
                tokens, size, digest = head
                data = bytearray(size)
                if f.readinto(data) != size or f.read(1):
                    raise ValueError("truncated or too long")
            check = hashlib.sha256(self.key + array.array("I", tokens).tobytes())
            check.update(data)
            if check.digest() != digest or tokens != entry.tokens:
                raise ValueError("checksum mismatch")
            with contextlib.suppress(OSError):
                os.utime(entry.path)  # recency survives a restart
        except FileNotFoundError:
            self._forget(entry)
            return None
        except (OSError, ValueError) as e:
            self._drop_bad(entry.path, str(e))
            return None
        with self._lock:
            entry.used = float(os.stat(entry.path).st_mtime_ns) if entry.path.exists() else entry.used
        return data

    def put(self, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> bool:
        """Write one state (atomically), then keep the budget. False when it was not written."""
        if not self.writable or not tokens:
            return False
        head, toks = encode(self.key, tokens, data)
        size = len(head) + len(toks) + len(data)
        if size > self.budget or self.holds(tokens):
            return False
        name = hashlib.sha256(toks).hexdigest()[:40] + _SUFFIX
        path = self.dir / name
        tmp = self.dir / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(toks)
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.stats.errors += 1
            self.writable = False
            why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                   errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file size limit is reached"}
            log.warning("prompt cache on disk turned off (%s: %s); the RAM cache goes on",
                        why.get(e.errno or 0, "a write failed"), e)
            return False
        with self._lock:
            new = list(tokens)
            for k, old in list(self._entries.items()):
                if common_prefix(old.tokens, new) == len(old.tokens):  # the new one covers it
                    self._entries.pop(k)
                    with contextlib.suppress(OSError):
                        old.path.unlink()
            self._entries[name] = DiskEntry(new, path, size, float(os.stat(path).st_mtime_ns))
            self.stats.writes += 1
            self._evict_locked()
            self._count_locked()
        return True

    def hit(self, saved: int) -> None:
        with self._lock:
            self.stats.hits += 1
            self.stats.tokens_saved += saved

    def _evict_locked(self) -> None:
        total = sum(e.size for e in self._entries.values())
        for k, e in sorted(self._entries.items(), key=lambda kv: kv[1].used):
            if total <= self.budget:
                break
            self._entries.pop(k)
            total -= e.size
            with contextlib.suppress(OSError):
                e.path.unlink()
        if self.shared_root is not None and self.shared_budget > 0:
            self._evict_shared_locked()

    def _evict_shared_locked(self) -> None:
        """Every model's states together within ``shared_budget``, least recently used first
        (<shared_root>/<model>/<settings key>/*.kv)."""
        assert self.shared_root is not None
        files: list[tuple[int, int, Path]] = []
        for p in self.shared_root.glob(f"*/*/*{_SUFFIX}"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.shared_budget:
                break
            total -= size
            with contextlib.suppress(OSError):
                p.unlink()
            if p.parent == self.dir:
                self._entries.pop(p.name, None)

    def _count_locked(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.bytes = sum(e.size for e in self._entries.values())

    def _forget(self, entry: DiskEntry) -> None:
        with self._lock:
            self._entries.pop(entry.path.name, None)
            self._count_locked()

    def _drop_bad(self, path: Path, why: str) -> None:
        log.warning("prompt cache: %s is damaged or foreign (%s): deleted", path.name, why)
        self.stats.errors += 1
        with contextlib.suppress(OSError):
            path.unlink()
        with self._lock:
            self._entries.pop(path.name, None)
            self._count_locked()


class CacheIO:
    """The prompt-cache thread: keeps the states the batch loop hands it (RAM tier, then
    disk tier) and reads states from disk for requests before they are admitted. The loop
    never waits for a lock held across I/O, a prefix search over the caches or a file."""

    def __init__(self, ram: RamCache | None, disk: DiskCache | None) -> None:
        self.ram = ram
        self.disk = disk
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="prompt-cache", daemon=True)
        self.thread.start()

    def keep(self, tokens: Sequence[int], data: bytearray, *, ram: bool) -> bool:
        """Queue a state to be kept (in RAM when ``ram``, on disk when there is a disk
        tier); False (dropped) when too many wait already: the cache is best effort."""
        to_disk = self.disk is not None and self.disk.writable
        if not (to_disk or (ram and self.ram is not None)):
            return False
        with self._lock:
            if self._pending >= _QUEUE:
                return False
            self._pending += 1
        toks = list(tokens)

        def job() -> None:
            try:
                if ram and self.ram is not None:
                    self.ram.put(toks, data)
                if to_disk and self.disk is not None:
                    self.disk.put(toks, data)
            finally:
                with self._lock:
                    self._pending -= 1

        self._jobs.put(job)
        return True

    def fetch(
        self, head: Sequence[int], better_than: int, done: Callable[[tuple[list[int], bytearray] | None], None]
    ) -> bool:
        """If the disk holds a longer prefix of ``head`` than ``better_than`` tokens, read
        it on this thread and call ``done`` with (tokens, state), or None when the file
        turned out damaged; False (``done`` is not called) when nothing is worth reading."""
        disk = self.disk
        found = None if disk is None else disk.best(head)
        if disk is None or found is None or found[0] <= better_than:
            return False
        entry = found[1]

        def job() -> None:
            data = disk.load(entry)
            done(None if data is None else (entry.tokens, data))

        self._jobs.put(job)
        return True

    def idle(self) -> bool:
        """True when no write is queued or running (tests wait for it)."""
        with self._lock:
            return self._pending == 0

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued (bounded), then stop."""
        self._jobs.put(None)
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("prompt cache: a job failed")
