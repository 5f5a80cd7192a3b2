"""Hot model swap: a new bundle takes over a running worker without stopping the consumer.

Two triggers, one path (``ModelSwapper.swap_to``): the bundle is loaded and verified (checksums by
``load_scorer``, k, one probe step as large as a micro-batch) in a thread, off the event loop, and then swapped in on the
loop, between two micro-batches. A bundle that fails is refused with one log line, counted in
``streamrec_model_swap_failures_total``, and the old model keeps serving.

- ``BundleWatcher`` polls ``--bundle`` every ``--bundle-poll-seconds`` (a Faust timer): the path
  with symlinks resolved (deploy/build-bundle.sh switches a ``current`` symlink) and the manifest's
  ``model_version``. When either changes it swaps; a refused bundle is not retried until it changes.
- ``ModelUpdates`` reads ``--model-updates-topic`` (`streamrec publish-model`). Every worker must
  hear every update, so it reads with a consumer of its own outside the consumer group (no group
  id, all partitions assigned, nothing committed): a group would hand the topic's partition to one
  worker only. The topic is compacted, so its newest message is the model the fleet should serve: a
  starting worker reads the topic to its end and swaps to the newest valid message before Faust
  starts, then applies each new message as it comes. A message is obeyed only for a bundle inside
  ``--bundle-root`` (default: the directory that holds ``--bundle``), the named path resolved with
  its symlinks: whoever can write the topic can choose among the bundles an operator put there, and
  cannot point the workers at any other directory on their disks.

Live sessions carry on. Every session state records the model and vocabulary it was made with
(``SessionState.model_tag`` / ``vocab_tag``); on a session's first click after a swap
``rebuild_states`` adapts it: item indices are remapped to the new vocabulary (when the old one is
known to this worker), the history is cut to the new model's ``history_len``, and for a ``hidden``
model the recent items kept in the state are replayed through the new scorer's ``step`` to rebuild
the hidden state. A session no longer than the kept window thus gets exactly the answers the new
model would have given it from its first click.

Under an A/B experiment (``--arms``, stream.experiment) every arm has a swapper of its own: the
watcher polls each arm's bundle path, and a model-updates message must name its arm (``arm``
field): one without is ignored (at start) or counted ``invalid``, so the newest message from before
the experiment cannot quietly replace an arm's bundle. A swap never moves a session to another arm:
the arm is recorded in its state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from pathlib import Path

import numpy as np

from export.scorer import StepInput
from streamrec.errors import UserError

log = logging.getLogger("streamrec.swap")


def model_tag(scorer) -> int:
    """32-bit tag of the model a state was made with (crc32 of its model_version)."""
    return zlib.crc32(str(scorer.manifest["model_version"]).encode())


def vocab_tag(item_ids) -> int:
    """32-bit tag of a vocabulary (the meaning of the item indices a state holds)."""
    return zlib.crc32("\n".join(map(str, item_ids)).encode())


def rebuild_states(states: list, scorer, new_model_tag: int, new_vocab_tag: int, old_vocabs: dict[int, np.ndarray]) -> None:
    """Adapt states made by another model to ``scorer``, in place (see the module docstring).

    ``old_vocabs``: vocab tag -> item ids (index i + 1 = item_ids[i]) of vocabularies this worker
    served before; the history of a state from an unknown other vocabulary cannot be read and is dropped.
    """
    keep = int(scorer.history_len)
    untagged = [s for s in states if s.model_tag == 0]  # built by hand (tests, tools): taken as the current model's
    for state in untagged:
        state.model_tag, state.vocab_tag = new_model_tag, new_vocab_tag
    states = [s for s in states if s.model_tag != new_model_tag]
    if not states:
        return
    for state in states:
        if state.vocab_tag != new_vocab_tag:
            old = old_vocabs.get(state.vocab_tag)
            if old is None:
                state.history = state.history[:0]
                state.top_items, state.top_scores = state.top_items[:0], state.top_scores[:0]
            else:
                history = scorer.vocab.encode(old[np.asarray(state.history, dtype=np.int64) - 1].tolist()) if len(state.history) else np.zeros(0, np.int64)
                state.history = history[history > 0].astype(np.int32)
                top = np.asarray(state.top_items, dtype=np.int64)
                state.top_items = (scorer.vocab.encode(old[top - 1].tolist()) if len(top) else top).astype(np.int32)  # 0 = not in the new vocabulary: never a hit
        state.history = state.history[-keep:] if keep else state.history[:0]
        state.model_tag, state.vocab_tag = new_model_tag, new_vocab_tag
    if scorer.kind == "hidden":
        _replay_hidden(states, scorer)


def _replay_hidden(states: list, scorer) -> None:
    """The GRU hidden state of every session after its kept items, all sessions in one batch per step."""
    hidden = np.zeros((len(states), scorer.hidden_size), dtype=np.float32)
    lengths = np.fromiter((len(s.history) for s in states), dtype=np.int64, count=len(states))
    if lengths.max(initial=0):
        items = np.zeros((len(states), int(lengths.max())), dtype=np.int64)
        for row, state in enumerate(states):
            items[row, : lengths[row]] = state.history
        for j in range(items.shape[1]):
            rows = np.flatnonzero(lengths > j)
            hidden[rows] = scorer.step(StepInput(items=items[rows, j], hidden=hidden[rows])).hidden
    for row, state in enumerate(states):
        state.hidden = hidden[row]


def bundle_identity(bundle: Path) -> tuple[str, str]:
    """(resolved path, manifest model_version or a marker of why it cannot be read): what the watcher compares."""
    resolved = os.path.realpath(bundle)
    try:
        with open(os.path.join(resolved, "manifest.json"), "rb") as f:
            version = str(json.loads(f.read()).get("model_version"))
    except (OSError, ValueError, AttributeError) as e:
        version = f"<unreadable: {type(e).__name__}>"
    return resolved, version


def load_verified(path: str, threads: int, k: int, rows: int = 1):
    """Load and check a bundle for serving (runs in a thread): checksums, k, one probe step of ``rows`` sessions."""
    from export.scorer import load_scorer

    scorer = load_scorer(path, threads=threads)
    if k > scorer.k:
        raise UserError(f"{path}: the bundle's k ({scorer.k}) is less than --k {k}")
    probe(scorer, path, rows)
    return scorer


def probe(scorer, path, rows: int) -> None:
    """Score ``rows`` new sessions at once; UserError unless every row gets finite scores.

    With ``rows`` = the largest micro-batch this is also the scorer's warm-up: ONNX Runtime's memory
    arena keeps what the largest batch so far needed (about 40 MB more for 256 rows than for 64 over
    20,000 items), so without it a worker's memory steps up whenever a backlog first brings a larger
    batch, and that batch pays for the allocation.
    """
    items, _ = scorer.popular()
    clicked = np.resize(items[:1], rows)
    try:
        out = scorer.step(StepInput(items=clicked, hidden=None, history=[clicked[:1]] * rows))
    except ValueError as e:  # e.g. a window model that wants event features, which the stream does not carry
        raise UserError(f"{path}: the model cannot score clicks: {e}") from None
    if out.top_items.shape[0] != rows or not np.isfinite(out.top_scores).all():
        raise UserError(f"{path}: the model's probe step gave no finite scores")


class ModelSwapper:
    """Loads, verifies and swaps bundles into a running worker: the one path of both triggers."""

    def __init__(self, worker, bundle: Path, arm: str | None = None):
        self.worker = worker
        self.arm = arm  # the A/B arm this swapper serves (stream.experiment), None without an experiment
        self.serving = bundle_identity(Path(bundle))  # (resolved path, model_version) of what serves now
        self._lock = asyncio.Lock()  # one swap at a time, whoever asks

    async def swap_to(self, path: str) -> bool:
        """Load, verify and serve the bundle at ``path``; False (logged, counted) when it is refused."""
        async with self._lock:
            settings, metrics = self.worker.settings, self.worker.metrics
            old = self._processor().scorer
            try:
                scorer = await asyncio.get_running_loop().run_in_executor(None, load_verified, path, settings.scorer_threads, settings.k, settings.batch_size)
            except Exception as e:  # anything wrong with the new bundle: refuse it, keep serving
                first_line = (str(e).splitlines() or [type(e).__name__])[0]
                log.error("model swap refused: %s (still serving %s)", first_line, old.manifest["model_version"])
                metrics.model_swap_failures.inc()
                return False
            self.use(scorer, path)
            log.warning("model swapped%s: %s -> %s (%s)", f" in arm {self.arm}" if self.arm else "", old.manifest["model_version"], scorer.manifest["model_version"], path)
            return True

    def _processor(self):
        """The processor this swapper replaces: the worker's, or its arm's."""
        processor = self.worker.processor
        return processor.processors[self.arm] if self.arm is not None else processor

    def use(self, scorer, path: str) -> None:
        """Serve ``scorer`` from the next micro-batch on (call on the worker's event loop)."""
        worker = self.worker
        old_processor = self._processor()
        old = old_processor.scorer
        processor = worker.make_processor(scorer, self.arm)
        processor.old_vocabs = {**old_processor.old_vocabs, old_processor.vocab_tag: old_processor.item_ids[1:]}
        processor.old_vocabs.pop(processor.vocab_tag, None)
        if self.arm is None:
            worker.scorer, worker.processor = scorer, processor
        else:
            worker.processor.processors[self.arm] = processor
            if worker.scorer is old:
                worker.scorer = scorer
        metrics = worker.metrics
        metrics.model_info.remove(*metrics.model_labels(old, self.arm))
        metrics.model_info.labels(*metrics.model_labels(scorer, self.arm)).set(1)
        worker.metrics.model_swaps.inc()
        self.serving = (os.path.realpath(path), str(scorer.manifest["model_version"]))


class BundleWatcher:
    """Watches a worker's ``--bundle`` and swaps a new one in between micro-batches."""

    def __init__(self, swapper: ModelSwapper, bundle: Path):
        self.swapper = swapper
        self.bundle = Path(bundle)
        self.watched = bundle_identity(self.bundle)  # what the path showed last time: acted on already

    def install(self, app, seconds: float) -> None:
        """Poll every ``seconds`` (a Faust timer, so it runs on the worker's loop between batches)."""
        arm = self.swapper.arm
        app.timer(seconds, name="streamrec.bundle-watch" + (f".{arm}" if arm is not None else ""))(self.poll)

    async def poll(self) -> bool:
        """Swap when the bundle changed; True if a new model now serves."""
        seen = bundle_identity(self.bundle)
        if seen == self.watched:
            return False
        self.watched = seen  # a refused bundle is not retried until the path or version changes again
        if seen == self.swapper.serving:
            return False
        return await self.swapper.swap_to(seen[0])


def bundle_root(setting: str, bundle: Path) -> str:
    """The resolved ``--bundle-root`` (``setting``, or the directory that holds ``bundle`` when empty); UserError if it is no directory."""
    root = setting or os.path.dirname(os.path.abspath(bundle))
    resolved = os.path.realpath(root)
    if not os.path.isdir(resolved):
        raise UserError(f"--bundle-root {root}: no such directory")
    return resolved


def inside_root(path: str, root: str) -> bool:
    """True when ``path``, resolved (symlinks, ``..``), lies strictly inside the resolved directory ``root``."""
    resolved = os.path.realpath(path)
    return resolved != root and os.path.commonpath([resolved, root]) == root


class UpdateError(ValueError):
    """A model-updates message that is not one."""


def update_message(bundle: str, model_version: str, arm: str | None = None) -> bytes:
    """A model-updates message: serve the bundle at ``bundle`` (a path as the workers see it), in A/B arm ``arm`` if given."""
    doc = {"bundle": bundle, "model_version": model_version, "published_at": time.time()}
    if arm is not None:
        doc["arm"] = arm
    return json.dumps(doc).encode()


def update_arm(value: bytes) -> str | None:
    """The optional ``arm`` of a model-updates message that ``parse_update`` accepted; UpdateError if it is no string."""
    arm = json.loads(value).get("arm")
    if arm is not None and (not isinstance(arm, str) or not arm):
        raise UpdateError("'arm' must be a non-empty string")
    return arm


def parse_update(value: bytes | None) -> tuple[str, str | None]:
    """(bundle path, model_version or None) of a model-updates message; UpdateError says what is wrong."""
    if not value:
        raise UpdateError("empty message")
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise UpdateError("not JSON") from None
    if not isinstance(doc, dict):
        raise UpdateError("not a JSON object")
    bundle, version = doc.get("bundle"), doc.get("model_version")
    if not isinstance(bundle, str) or not bundle:
        raise UpdateError("'bundle' must be a non-empty path")
    if version is not None and not isinstance(version, str):
        raise UpdateError("'model_version' must be a string")
    return bundle, version


UPDATES_KEY = b"bundle"  # every message has this key, so compaction keeps the newest one
CATCH_UP_SECONDS = 30.0  # longest a starting worker reads the model-updates topic before serving


class ModelUpdates:
    """Reads ``--model-updates-topic`` and swaps to the bundle each message names (see the module docstring).

    Outcomes, counted in ``streamrec_model_updates_total{outcome}``: ``swapped``; ``unchanged``
    (that bundle and version serve already); ``refused`` (the bundle is missing, fails its checks, or
    is not the version the message names: also a swap failure); ``outside_root`` (the path does not
    resolve inside ``--bundle-root``: nothing is read from it, and it is no swap failure but a
    message nobody should have sent); ``invalid`` (not a model-updates message).
    """

    def __init__(self, swapper: ModelSwapper, settings, root: str, arms: dict | None = None):
        self.swapper = swapper  # without an experiment the only one; with one, the first arm's
        self.arms = arms or {}  # arm name -> ModelSwapper under an experiment
        self.settings = settings
        self.topic = settings.model_updates_topic
        self.root = root  # resolved (bundle_root)
        self.consumer = None

    async def start(self) -> None:
        """Read the topic to its end and apply the newest valid message (before the worker starts serving)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from stream.topics import topic_partitions

        partitions = (await topic_partitions(self.settings, [self.topic]))[self.topic]
        self.consumer = consumer = AIOKafkaConsumer(**self.settings.kafka_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=500)
        await consumer.start()
        if not partitions:
            raise UserError(f"topic '{self.topic}' (--model-updates-topic) does not exist on {self.settings.broker}")
        tps = [TopicPartition(self.topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        newest: dict = {}  # partition -> (record timestamp, bundle, version) of its last valid message
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:  # what is left is applied by listen(), message by message
                log.warning("'%s' not read to its end within %.0f s; going on", self.topic, CATCH_UP_SECONDS)
                break
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    try:
                        bundle, version = parse_update(record.value)
                        arm = update_arm(record.value)
                    except UpdateError:
                        continue  # history: counted by the workers that were running when it came
                    if (arm is None) != (not self.arms) or (arm is not None and arm not in self.arms):
                        continue  # for another set-up: no arm under an experiment, or an arm this worker lacks
                    newest[record.partition, arm] = (record.timestamp, bundle, version)  # offset order within a partition
        for arm in dict.fromkeys(a for _, a in newest):  # the newest message for each arm (None: none named)
            _, bundle, version = max((m for (_, a), m in newest.items() if a == arm), key=lambda m: m[0])  # one partition unless made otherwise
            await self.apply(bundle, version, arm)

    async def listen(self) -> None:
        """Apply every new message until cancelled (a Faust task); never raises for a bad message."""
        try:
            while True:
                try:
                    fetched = await self.consumer.getmany(timeout_ms=1000)
                except Exception as e:  # the consumer retries on its own; keep listening
                    log.warning("reading '%s' failed (%r); retrying", self.topic, e)
                    await asyncio.sleep(1.0)
                    continue
                for records in fetched.values():
                    for record in records:
                        try:
                            await self.handle(record.value)
                        except Exception:  # a bug here must not stop the updates, nor the worker
                            log.exception("model update at offset %d failed", record.offset)
        finally:
            await self.consumer.stop()

    async def handle(self, value: bytes | None) -> str:
        """Act on one message; its outcome."""
        try:
            bundle, version = parse_update(value)
            arm = update_arm(value)
            if arm is not None and arm not in self.arms:
                raise UpdateError(f"arm '{arm}' is not an arm of this worker's experiment ({', '.join(self.arms) or 'none'})")
            if arm is None and self.arms:
                raise UpdateError(f"names no arm, and this worker serves an experiment (arms {', '.join(self.arms)})")
        except UpdateError as e:
            log.error("model update ignored: %s (%r...)", e, (value or b"")[:200])
            self.swapper.worker.metrics.model_updates.labels("invalid").inc()
            return "invalid"
        return await self.apply(bundle, version, arm)

    async def apply(self, bundle: str, version: str | None, arm: str | None = None) -> str:
        """Swap ``arm`` (None: the only model, without an experiment) to ``bundle``; the outcome."""
        metrics = self.swapper.worker.metrics
        swapper = self.arms.get(arm, self.swapper)
        if not inside_root(bundle, self.root):  # checked before the path is read at all
            log.error("model swap refused: %s resolves to %s, not under --bundle-root %s (still serving %s)", bundle, os.path.realpath(bundle), self.root, swapper.serving[1])
            metrics.model_updates.labels("outside_root").inc()
            return "outside_root"
        seen = bundle_identity(Path(bundle))
        if seen == swapper.serving and version in (None, seen[1]):
            outcome = "unchanged"
        elif not os.path.isdir(seen[0]):
            log.error("model swap refused: %s is not a bundle directory (still serving %s)", bundle, swapper.serving[1])
            metrics.model_swap_failures.inc()
            outcome = "refused"
        elif version is not None and version != seen[1]:
            log.error("model swap refused: %s holds model_version %s, the update names %s (still serving %s)", bundle, seen[1], version, swapper.serving[1])
            metrics.model_swap_failures.inc()
            outcome = "refused"
        else:
            outcome = "swapped" if await swapper.swap_to(seen[0]) else "refused"
        metrics.model_updates.labels(outcome).inc()
        return outcome


def install(worker, bundle: Path, loop: asyncio.AbstractEventLoop) -> ModelSwapper:
    """Wire both swap triggers into a worker whose Faust app has not started yet (stream.worker.serve).

    Reads the model-updates topic to its end first, on ``loop``, so that a starting worker serves the
    fleet's current model from its first click.
    """
    settings = worker.settings
    paths = {a.name: Path(a.bundle) for a in settings.experiment_arms()} or {None: Path(bundle)}
    swappers = {arm: ModelSwapper(worker, path, arm) for arm, path in paths.items()}
    swapper = next(iter(swappers.values()))
    if settings.bundle_poll_seconds:
        for arm, path in paths.items():
            BundleWatcher(swappers[arm], path).install(worker.app, settings.bundle_poll_seconds)
    if settings.model_updates_topic:
        updates = ModelUpdates(swapper, settings, bundle_root(settings.bundle_root, bundle), {a: sw for a, sw in swappers.items() if a is not None})
        loop.run_until_complete(updates.start())
        worker.app.task(updates.listen)
    return swapper
