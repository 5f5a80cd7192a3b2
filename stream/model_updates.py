"""The model-updates message (`streamrec publish-model`) and its reader in every worker.

``--model-updates-topic`` (compacted, every message keyed ``UPDATES_KEY``) holds JSON messages
``{"bundle": path, "model_version": str, "published_at": unix seconds[, "arm": name]}``
(``update_message``; ``parse_update`` and ``update_arm`` read one back, ``UpdateError`` says what is wrong).

``ModelUpdates`` reads the topic. Every worker must hear every update, so it reads with a consumer
of its own outside the consumer group (no group id, all partitions assigned, nothing committed): a
group would hand the topic's partition to one worker only. The topic is compacted, so its newest
message is the model the fleet should serve: a starting worker reads the topic to its end and swaps
to the newest valid message before Faust starts, then applies each new message as it comes. A
message is obeyed only for a bundle inside ``--bundle-root`` (default: the directory that holds
``--bundle``), the named path resolved with its symlinks: whoever can write the topic can choose
among the bundles an operator put there, and cannot point the workers at any other directory on
their disks. Under an A/B experiment a message must name its arm (``arm`` field): one without is
ignored (at start) or counted ``invalid``. The swap itself is stream.swap's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from stream.bundles import bundle_identity, inside_root
from streamrec.errors import UserError

log = logging.getLogger("streamrec.swap")  # the swap's log lines, whichever trigger


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
    """Reads ``--model-updates-topic`` and swaps (a stream.swap.ModelSwapper) to the bundle each message names (see the module docstring).

    Outcomes, counted in ``streamrec_model_updates_total{outcome}``: ``swapped``; ``unchanged``
    (that bundle and version serve already); ``refused`` (the bundle is missing, fails its checks, or
    is not the version the message names: also a swap failure); ``outside_root`` (the path does not
    resolve inside ``--bundle-root``: nothing is read from it, and it is no swap failure but a
    message nobody should have sent); ``invalid`` (not a model-updates message).
    """

    def __init__(self, swapper, settings, root: str, arms: dict | None = None):
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
