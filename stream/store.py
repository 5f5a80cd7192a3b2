"""Where the worker keeps its session states: Faust's in-memory store or its RocksDB store (--store).

The worker bypasses Faust's table writes (it sends the changelog records itself, stream.worker), so
it reads and writes the store through ``SessionStore``:

- a state the worker has computed but whose changelog record the broker has not confirmed yet lives
  in ``pending`` (a tombstone as None), which every read sees first; the store itself is written
  only once the record is confirmed, in the order the broker confirms a partition's records (the
  done-callbacks of one partition's batches run in send order). So the store never holds a state
  the changelog lacks.
- With RocksDB the same write batch also records the changelog offset the partition's database now
  reflects (Faust's ``set_persisted_offset``). A worker restarted on its data directory, or one that
  stood by for a partition (--standby-replicas), then recovers from that offset: the changelog's tail
  only. (Were a state written before its record was confirmed, a worker killed in between would keep
  it, skip the redelivered click as already applied, and that click would never be answered.)
- The live-session count: the memory store's length; with RocksDB (whose length means reading every
  key) the count found by the last expiry scan plus the sessions started since.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

from stream.transport import rocksdb_offset_key, rocksdb_partition_db
from streamrec.errors import UserError

STORES = ("memory", "rocksdb")
# RocksDB options of each partition's database (Faust's defaults are a 2 GiB block cache and 3 write buffers of
# 64 MiB, per partition): the states are read back from the block cache or the OS page cache.
ROCKSDB_OPTIONS = dict(write_buffer_size=16 * 1024**2, max_write_buffer_number=2, block_cache_size=64 * 1024**2)
_ABSENT = object()


def faust_store(settings) -> tuple[str, dict]:
    """faust.App keyword arguments and table options of ``settings.store``."""
    if settings.store == "memory":
        return "memory://", {}
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        raise UserError("--store rocksdb needs the rocksdict package (pip install rocksdict)") from None
    return "rocksdb://", dict(ROCKSDB_OPTIONS, driver="rocksdict")


def default_data_dir(app_id: str, metrics_port: int) -> Path:
    """Where a worker keeps its RocksDB state without --data-dir: one directory per app id and metrics port
    (two workers on one machine never share a metrics port), stable across restarts."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "streamrec" / f"{app_id}-{metrics_port}"


def lock_data_dir(path: Path):
    """Create ``path`` and hold an exclusive lock on it for the life of the process (a second worker on the
    same directory would find each partition's database locked); the open lock file."""
    import fcntl

    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / ".streamrec.lock", "a")
    except OSError as e:
        raise UserError(f"--data-dir {path}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--data-dir {path} is in use by another worker; give each worker a --data-dir of its own") from None
    return lock


class SessionStore:
    """The worker's reads and writes of the sessions table's store (see the module docstring)."""

    def __init__(self, table, rocksdb: bool):
        self.table = table
        self.rocksdb = rocksdb
        self.pending: dict[bytes, bytes | None] = {}  # states (None: tombstones) sent, not yet confirmed
        self._counted = 0  # rocksdb: sessions found by the last scan plus those started since
        self._missed: set[bytes] = set()  # keys read and found absent (new sessions, once put)

    @property
    def _faust(self):
        return self.table.data

    def _db(self, partition: int):
        """The partition's RocksDB database if it is open here (an owned or stood-by partition), else None."""
        return rocksdb_partition_db(self._faust, partition)

    def get(self, key: bytes, partition: int) -> bytes | None:
        raw = self.pending.get(key, _ABSENT)
        if raw is _ABSENT:
            if self.rocksdb:  # a partition this worker consumes: Faust opened its database on assignment (or opens it now)
                raw = rocksdb_partition_db(self._faust, partition, open_it=True).get(key)
            else:
                raw = self._faust.get(key)
        if raw is None:
            self._missed.add(key)
        return raw

    def put(self, key: bytes, raw: bytes | None) -> None:
        """A state (None: a tombstone) whose changelog record is about to be sent."""
        if raw is not None and key in self._missed:
            self._missed.discard(key)
            self._counted += 1
        self.pending[key] = raw

    def confirmed(self, topic: str, partition: int, records: list, future) -> None:
        """Done-callback of a changelog batch: write its records to the store (and, with RocksDB, the
        offset of its last record), dropping from ``pending`` what no later state replaced."""
        if future.cancelled() or future.exception() is not None:
            return  # the worker stops (stream.worker): the store keeps the last confirmed states
        pending = self.pending
        for key, raw in records:
            if pending.get(key, _ABSENT) is raw:
                del pending[key]
        if self.rocksdb:
            db = self._db(partition)
            if db is None:  # the partition moved on: its database keeps an older, consistent prefix
                return
            import rocksdict

            batch = rocksdict.WriteBatch(raw_mode=True)
            for key, raw in records:
                if raw is None:
                    batch.delete(key)
                else:
                    batch.put(key, raw)
            batch.put(rocksdb_offset_key(self._faust), str(future.result().offset + len(records) - 1).encode())
            db.write(batch)
        else:
            data = self._faust
            for key, raw in records:
                if raw is None:
                    data.pop(key, None)
                else:
                    data[key] = raw

    def unsent(self, records: list) -> None:
        """(key, raw) records whose changelog writes will never be made (under exactly_once, expiry
        tombstones of a partition revoked before their transaction): out of ``pending``, unless a later
        state replaced them, so that they neither leak nor hide the stored state."""
        pending = self.pending
        for key, raw in records:
            if pending.get(key, _ABSENT) is raw:
                del pending[key]

    def on_sent(self, topic: str, partition: int, records: list):
        """The done-callback ``confirmed`` bound to one changelog batch (stream.outbox.Outbox.send's ``on_sent``);
        None for a batch of another topic (answers the same send carries)."""
        if topic != self.table.changelog_topic_name:
            return None
        return functools.partial(self.confirmed, topic, partition, records)

    def drop(self, key: bytes) -> None:
        """Forget a state locally, without a tombstone (memory store: left over from a partition gone elsewhere)."""
        self._faust.pop(key, None)

    def scan(self, owned: set[int]) -> Iterator[tuple[bytes, bytes]]:
        """(key, state) of every stored session: the memory store's all (others' left-overs too), RocksDB's
        of the owned partitions; pending states are the caller's to skip."""
        if not self.rocksdb:
            data = self._faust
            for key in list(data.keys()):
                raw = data.get(key)
                if raw is not None:
                    yield key, raw
            return
        offset_key = rocksdb_offset_key(self._faust)
        for partition in sorted(owned):
            db = self._db(partition)
            if db is None:
                continue
            for key, raw in db.items():
                if key != offset_key:
                    yield key, raw

    def scanned(self, live: int) -> None:
        """The expiry scan found ``live`` sessions."""
        self._counted = live
        self._missed.clear()

    def new_batch(self) -> None:
        self._missed.clear()

    def count(self) -> int:
        """Live sessions (see the module docstring)."""
        if self.rocksdb:
            return self._counted
        data = self._faust
        n = len(data)
        for key, raw in self.pending.items():  # a few batches' worth at most
            stored = key in data
            n += (raw is not None and not stored) - (raw is None and stored)
        return n
