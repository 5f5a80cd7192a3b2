"""--store rocksdb (stream.store): a worker restarted on its data directory recovers from its local
state plus the changelog's tail and loses no answer; the flags' bad values are one-line errors.

(The end-to-end checks with the RocksDB store, online = offline and expiry with tombstones, are
tests/test_stream_worker.py's, run for both stores.)
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from stream.process import start_worker, stop_worker
from stream.settings import Settings
from stream.store import SessionStore, lock_data_dir
from stream.worker import TABLE
from streamrec.errors import UserError
from tests.streamkit import REBALANCE_RERUN, PacedSender, answered, click_stream, end_offsets, kill_worker, sessions_of, streamrec
from tests.test_recovery import check_answers
from tests.test_stream_support import gru_bundle, markov_bundle, metric, metrics_text, stream_data, wait_for, worker_settings  # noqa: F401


def test_bad_store_settings_are_one_line_errors(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(UserError, match=r"^--store must be one of memory, rocksdb, got 'disk'$"):
        Settings(store="disk")
    with pytest.raises(UserError, match=rf"^--data-dir {a_file} is not a directory$"):
        Settings(store="rocksdb", data_dir=str(a_file))
    done = streamrec("serve", "--store", "disk", timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == ["error: Invalid value for '--store': 'disk' is not one of 'memory', 'rocksdb'."], done.stderr
    done = streamrec("serve", "--store", "rocksdb", "--data-dir", str(a_file), timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: --data-dir {a_file} is not a directory"], done.stderr


def test_a_data_dir_in_use_by_another_worker_is_refused_in_one_line(markov_bundle, tmp_path):
    state = tmp_path / "state"
    held = lock_data_dir(state)
    try:
        with pytest.raises(UserError, match="is in use by another worker"):
            lock_data_dir(state)
        done = streamrec("serve", "--bundle", str(markov_bundle[1]), "--store", "rocksdb", "--data-dir", str(state), "--broker", "kafka://127.0.0.1:1", timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1:] == [f"error: --data-dir {state} is in use by another worker; give each worker a --data-dir of its own"], done.stderr
    finally:
        held.close()
    lock_data_dir(state).close()  # free again once its holder is gone


@pytest.mark.broker
@REBALANCE_RERUN
@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_a_sigkilled_worker_restarted_reads_only_the_changelog_tail_with_rocksdb_and_loses_nothing(store, broker, stream_data, gru_bundle, tmp_path):
    """With RocksDB on the same --data-dir, the restart reads what its database lacked; the memory store, for
    comparison (and as proof that the count counts), reads the whole changelog."""
    _, bundle = gru_bundle
    settings = worker_settings(broker, partitions=4, store=store, data_dir=str(tmp_path / "state"))
    changelog = f"{settings.app_id}-{TABLE}-changelog"
    rate = 120.0
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=300, clicks=40, seed=12, prefix="d")  # 100 s' worth: stopped earlier
    sender = PacedSender(settings, messages, rate)
    worker = start_worker(settings, bundle, tmp_path / "worker-0.log")
    try:
        sender.start()
        # killed once it has caught up (under 1 s behind): a worker working off a backlog has MAX_PENDING_BATCHES full
        # batches answered whose states are not in the changelog yet, answered again after the restart (at-least-once)
        assert wait_for(lambda: answered(settings) > 1500 and answered(settings) >= sender.sent - rate, timeout=90), "the first worker did not get going"
        kill_worker(worker)
        written = sum(end_offsets(settings, changelog).values())
        worker = start_worker(settings, bundle, tmp_path / "worker-1.log")
        assert wait_for(lambda: answered(settings) > 0, timeout=60), "the restarted worker never answered"
        recovered = metric(metrics_text(settings), "streamrec_changelog_records_recovered_total")
        time.sleep(2.0)
        assert sender.is_alive(), "the stream ended before the restart was seen: raise the click count"
        sent = sender.finish(timeout=30, stop=True)
        total, duplicates = check_answers(settings, bundle, sessions_of(sent), rate, interruptions=1)
    finally:
        status = stop_worker(worker)
    assert status == 0, (tmp_path / "worker-1.log").read_text()[-3000:]
    assert written > 1000, written
    if store == "rocksdb":  # at most the records of the killed worker's last unconfirmed batches
        assert recovered < written / 10, (recovered, written)
    else:
        assert recovered == written, (recovered, written)
    print(f"--store {store}: {len(sent):,} clicks, SIGKILL at {written:,} changelog records, the restart read {recovered:.0f} of them: {total:,} answers, {duplicates} duplicates")


@pytest.mark.broker
def test_a_worker_on_the_memory_store_leaves_no_data_directory_behind(broker, markov_bundle, tmp_path, monkeypatch):
    """Faust makes its data directory when it starts, by default ``<app id>-data`` in the working directory:
    a worker on the memory store, which writes nothing there, gives it a temporary one removed when it stops."""
    from stream.process import wait_until_serving

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    settings = worker_settings(broker, store="memory")
    worker = start_worker(settings, markov_bundle[1], tmp_path / "worker.log")
    try:
        wait_until_serving(settings, worker)
        assert [p.name.startswith(f"{settings.app_id}-faust-") for p in tmp.iterdir()] == [True], list(tmp.iterdir())
    finally:
        status = stop_worker(worker)
    assert status == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == [], (list(cwd.iterdir()), list(tmp.iterdir()))


def test_tombstones_never_written_because_their_partition_moved_leave_pending_and_the_stored_state_shows_again():
    """Under exactly_once an expiry tombstone whose transaction found its partition revoked (NotOwned) is
    never written: it must not stay in ``pending`` (a leak, and it hid the stored state from the next
    expiry scan, which then never dropped it), unless a later state replaced it."""
    store = SessionStore(SimpleNamespace(data={b"a": b"state-a", b"b": b"state-b"}, changelog_topic_name="c"), rocksdb=False)
    store.put(b"a", None)
    store.put(b"b", None)
    store.put(b"b", b"newer")  # a click after the tombstone was queued: its state replaces it
    assert store.get(b"a", 0) is None and store.count() == 1
    store.unsent([(b"a", None), (b"b", None)])
    assert store.pending == {b"b": b"newer"}
    assert store.get(b"a", 0) == b"state-a" and store.get(b"b", 0) == b"newer"
    assert [key for key, _ in store.scan({0})] == [b"a", b"b"] and store.count() == 2
