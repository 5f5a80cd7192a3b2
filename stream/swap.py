"""Hot model swap: a new bundle takes over a running worker without stopping the consumer.

Two triggers, one path (``ModelSwapper.swap_to``): the bundle is loaded and verified
(stream.bundles.load_verified: checksums by ``load_scorer``, k, one probe step as large as a
micro-batch) in a thread, off the event loop, and then swapped in on the loop, between two micro-batches. A bundle that fails is refused with one log line, counted in
``streamrec_model_swap_failures_total``, and the old model keeps serving.

- ``BundleWatcher`` polls ``--bundle`` every ``--bundle-poll-seconds`` (a Faust timer): the path
  with symlinks resolved (deploy/build-bundle.sh switches a ``current`` symlink) and the manifest's
  ``model_version``. When either changes it swaps; a refused bundle is not retried until it changes.
- ``ModelUpdates`` (stream.model_updates) reads ``--model-updates-topic`` (`streamrec publish-model`)
  with a consumer of its own outside the consumer group, and obeys a message only for a bundle
  inside ``--bundle-root``.

Live sessions carry on: on a session's first click after a swap its state is adapted to the new
model (stream.migration.rebuild_states).

Under an A/B experiment (``--arms``, stream.experiment) every arm has a swapper of its own: the
watcher polls each arm's bundle path, and a model-updates message must name its arm (``arm``
field): one without is ignored (at start) or counted ``invalid``, so the newest message from before
the experiment cannot quietly replace an arm's bundle. A swap never moves a session to another arm:
the arm is recorded in its state.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from stream.bundles import bundle_identity, bundle_root, load_verified
from stream.model_updates import ModelUpdates

log = logging.getLogger("streamrec.swap")


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
