"""A/B experiments on the live stream: several bundles served at once, each session in one arm.

A session is assigned to an arm on its first click by a stable hash of (experiment name, session
id) and the arms' weights (``assign``); the arm is then recorded in the session's state
(``SessionState.arm_tag``) and read from there on every later click, so a worker restart, a
rebalance, a hot swap or new weights never move a session that already has an arm. Only sessions
without a recorded arm (new ones, ones whose state expired, ones of an arm no longer configured)
follow the current weights. A weight of 0 takes no new sessions and keeps serving its own.

``ArmedProcessor`` routes each micro-batch's clicks to the arms' ``BatchProcessor`` s (still pure:
no Kafka). ``report`` computes what `streamrec experiment report` prints: per arm, sessions,
evaluated clicks, HR@K and MRR@K with 95 % percentile-bootstrap intervals over sessions, and a
two-sided permutation test over sessions of each arm against the first one. Sessions, not clicks,
are the independent unit: a session's clicks share its user and its arm.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from stream.state import arm_tag
from streamrec.errors import UserError

RESAMPLES = 2000  # bootstrap resamples and permutations of the report
ALPHA = 0.05


@dataclass(frozen=True)
class Arm:
    name: str
    bundle: str
    weight: float


def parse_arms(text: str) -> tuple[Arm, ...]:
    """``NAME=BUNDLE:WEIGHT,NAME=BUNDLE:WEIGHT...`` (the ``--arms`` setting); UserError says what is wrong."""
    arms = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, rest = part.partition("=")
        bundle, colon, weight = rest.rpartition(":")
        if not eq or not colon or not name.strip() or not bundle.strip():
            raise UserError(f"--arms wants NAME=BUNDLE:WEIGHT[,NAME=BUNDLE:WEIGHT...], got '{part}'")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"--arms: the weight of arm '{name.strip()}' must be a number, got '{weight}'") from None
        if not math.isfinite(w) or w < 0:
            raise UserError(f"--arms: the weight of arm '{name.strip()}' must be a finite number >= 0, got {weight}")
        arms.append(Arm(name.strip(), bundle.strip(), w))
    names = [a.name for a in arms]
    if len(arms) < 2:
        raise UserError(f"--arms needs at least two arms, got {len(arms)}")
    if len(set(names)) != len(names):
        raise UserError(f"--arms: arm names must differ, got {', '.join(names)}")
    if len({arm_tag(n) for n in names}) != len(names):
        raise UserError(f"--arms: arm names {', '.join(names)} collide in the 32-bit tag the session state records; rename one")
    if sum(a.weight for a in arms) <= 0:
        raise UserError("--arms: at least one weight must be above 0")
    return tuple(arms)


def bucket(experiment: str, session_key: bytes) -> float:
    """A session's point in [0, 1): sha256 of the experiment name, a 0 byte and the session id (UTF-8), first 8 bytes."""
    digest = hashlib.sha256(experiment.encode() + b"\0" + session_key).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(experiment: str, session_key: bytes, weights: list[float]) -> int:
    """Index of the arm a new session goes to: the weights cut [0, 1) into consecutive intervals."""
    u = bucket(experiment, session_key) * sum(weights)
    edge = 0.0
    last = max(i for i, w in enumerate(weights) if w > 0)
    for i, w in enumerate(weights):
        edge += w
        if u < edge and w > 0:
            return i
    return last  # rounding at the top end


class ArmedProcessor:
    """Routes each click to its session's arm and merges the arms' results (still no Kafka)."""

    def __init__(self, experiment: str, arms: tuple[Arm, ...], processors: list):
        self.experiment = experiment
        self.arms = arms
        self.processors = {a.name: p for a, p in zip(arms, processors)}
        self.by_tag = {arm_tag(a.name): a.name for a in arms}
        self.weights = [a.weight for a in arms]

    def arm_of(self, key: bytes | None, state) -> str:
        """The recorded arm of a session, else the one its hash and the weights give."""
        if state is not None and state.arm_tag in self.by_tag:
            return self.by_tag[state.arm_tag]
        if key is None:  # not a valid click (dead-lettered by whichever arm gets it)
            return self.arms[0].name
        return self.arms[assign(self.experiment, key, self.weights)].name

    def process(self, records: list, load_state):
        from stream.processor import BatchResult

        loaded: dict[bytes, object] = {}
        groups: dict[str, list] = defaultdict(list)
        for r in records:
            if r.key is not None and r.key not in loaded:
                loaded[r.key] = load_state(r.key)
            groups[self.arm_of(r.key, loaded.get(r.key) if r.key is not None else None)].append(r)
        out = BatchResult()
        for name, batch in groups.items():
            result = self.processors[name].process(batch, loaded.get)
            out.recommendations += result.recommendations
            out.dead_letters += result.dead_letters
            out.answer_partitions += result.answer_partitions
            out.dead_letter_partitions += result.dead_letter_partitions
            out.states.update(result.states)
            out.latencies += result.latencies
            out.unknown_items += result.unknown_items
            out.online_evaluated += result.online_evaluated
            out.online_ranks += result.online_ranks
            out.inference_seconds += result.inference_seconds
            out.redelivered += result.redelivered
            out.arm_ranks[name] = result.online_ranks
        return out


# ---------------------------------------------------------------- the report's statistics


@dataclass
class ArmSample:
    """One arm's evaluated clicks, summed per session (the independent unit)."""

    arm: str
    sessions: int  # sessions answered by the arm
    evaluated: np.ndarray  # [S] evaluated clicks per session (sessions with at least one)
    hits: np.ndarray  # [S] hits@K per session
    rr: np.ndarray  # [S] sum of reciprocal ranks within K per session


def per_session(arm: str, sessions: int, ranks: dict[str, list[int]], k: int) -> ArmSample:
    """Sum each session's ranks (0 = not in the list) into evaluated clicks, hits@k and reciprocal ranks."""
    ev, hits, rr = [], [], []
    for rs in ranks.values():
        r = np.asarray(rs, dtype=np.float64)
        inside = (r > 0) & (r <= k)
        ev.append(len(r))
        hits.append(float(inside.sum()))
        rr.append(float((1.0 / r[inside]).sum()))
    return ArmSample(arm, sessions, np.asarray(ev, np.float64), np.asarray(hits, np.float64), np.asarray(rr, np.float64))


def ratio(values: np.ndarray, evaluated: np.ndarray) -> float:
    """The click-weighted metric (what the offline evaluation and the worker's gauges report): sum / evaluated clicks."""
    n = evaluated.sum()
    return float(values.sum() / n) if n else 0.0


def bootstrap_interval(values: np.ndarray, evaluated: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``ratio``, resampling sessions with replacement."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    stats = np.empty(resamples)
    for start in range(0, resamples, 200):
        idx = rng.integers(0, n, size=(min(200, resamples - start), n))
        stats[start : start + len(idx)] = values[idx].sum(1) / np.maximum(evaluated[idx].sum(1), 1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def permutation_p(a_values: np.ndarray, a_eval: np.ndarray, b_values: np.ndarray, b_eval: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES) -> float:
    """Two-sided permutation test of ratio(b) - ratio(a): sessions' arm labels shuffled, the groups' sizes kept.

    p = (1 + permutations at least as extreme) / (1 + permutations).
    """
    values, evaluated = np.concatenate([a_values, b_values]), np.concatenate([a_eval, b_eval])
    n_a, n = len(a_values), len(a_values) + len(b_values)
    if n_a == 0 or n_a == n:
        return 1.0
    observed = abs(ratio(b_values, b_eval) - ratio(a_values, a_eval))
    extreme = 0
    for start in range(0, resamples, 200):
        m = min(200, resamples - start)
        in_a = np.argsort(rng.random((m, n)), axis=1) < n_a  # a random split of the sessions, sizes kept
        a = (values * in_a).sum(1) / np.maximum((evaluated * in_a).sum(1), 1)
        b = (values * ~in_a).sum(1) / np.maximum((evaluated * ~in_a).sum(1), 1)
        extreme += int((np.abs(b - a) >= observed - 1e-12).sum())
    return (1 + extreme) / (1 + resamples)


@dataclass
class Report:
    experiment: str
    k: int
    arms: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    verdict: str = ""
    unassigned: int = 0  # evaluated clicks whose previous answer named no arm of this experiment
    interval: str = f"95% percentile bootstrap over sessions ({RESAMPLES} resamples) of the click-weighted metric"
    test: str = f"two-sided permutation test over sessions ({RESAMPLES} permutations) of the difference in the click-weighted metric, each arm against the first"

    def as_dict(self) -> dict:
        return dict(experiment=self.experiment, k=self.k, interval=self.interval, test=self.test, alpha=ALPHA, arms=self.arms, comparisons=self.comparisons, verdict=self.verdict, unassigned_clicks=self.unassigned)

    def text(self) -> str:
        k = self.k
        lines = [f"experiment {self.experiment}: online HR@{k} and MRR@{k} per arm, {self.interval}", ""]
        lines.append(f"{'arm':<16} {'sessions':>9} {'evaluated':>10} {'HR@' + str(k):>8} {'95% CI':>17} {'MRR@' + str(k):>8} {'95% CI':>17}")
        for a in self.arms:
            hr, mrr = a[f"HR@{k}"], a[f"MRR@{k}"]
            lines.append(f"{a['arm']:<16} {a['sessions']:>9,} {a['evaluated']:>10,} {hr['value']:>8.4f} {_ci(hr['ci']):>17} {mrr['value']:>8.4f} {_ci(mrr['ci']):>17}")
        lines += ["", f"test: {self.test}, alpha {ALPHA}" + (" (Bonferroni-corrected over the comparisons)" if len(self.comparisons) > 2 else "")]
        for c in self.comparisons:
            lines.append(f"{c['arm']} - {c['against']}: {c['metric']} {c['difference']:+.4f}, p = {c['p_value']:.4f}, {'significant' if c['significant'] else 'not significant'}")
        lines += ["", f"verdict: {self.verdict}"]
        return "\n".join(lines)


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def report(experiment: str, samples: list[ArmSample], k: int, unassigned: int = 0, seed: int = 0, resamples: int = RESAMPLES) -> Report:
    """Per-arm metrics with intervals, each later arm tested against the first (the champion), and a verdict on HR@k."""
    rng = np.random.default_rng(seed)
    out = Report(experiment, k, unassigned=unassigned)
    for s in samples:
        row = {"arm": s.arm, "sessions": s.sessions, "evaluated_sessions": int(len(s.evaluated)), "evaluated": int(s.evaluated.sum())}
        for name, values in ((f"HR@{k}", s.hits), (f"MRR@{k}", s.rr)):
            row[name] = {"value": ratio(values, s.evaluated), "ci": list(bootstrap_interval(values, s.evaluated, rng, resamples))}
        out.arms.append(row)
    if len(samples) < 2:
        out.verdict = "fewer than two arms with answers: nothing to compare"
        return out
    base = samples[0]
    alpha = ALPHA / (len(samples) - 1)  # Bonferroni over the comparisons with the first arm
    verdicts = []
    for s in samples[1:]:
        for name, attr in ((f"HR@{k}", "hits"), (f"MRR@{k}", "rr")):
            diff = ratio(getattr(s, attr), s.evaluated) - ratio(getattr(base, attr), base.evaluated)
            p = permutation_p(getattr(base, attr), base.evaluated, getattr(s, attr), s.evaluated, rng, resamples)
            out.comparisons.append({"arm": s.arm, "against": base.arm, "metric": name, "difference": diff, "p_value": p, "significant": p < alpha})
        hr = out.comparisons[-2]
        if hr["significant"]:
            winner, loser = (s.arm, base.arm) if hr["difference"] > 0 else (base.arm, s.arm)
            verdicts.append(f"{winner} beats {loser} on HR@{k} ({hr['difference']:+.4f}, p = {hr['p_value']:.4f} < {alpha:.3g})")
        else:
            verdicts.append(f"no significant difference between {s.arm} and {base.arm} on HR@{k} (p = {hr['p_value']:.4f} >= {alpha:.3g})")
    out.verdict = "; ".join(verdicts)
    return out


def report_from_topics(click_values: list, recommendation_values: list[bytes], experiment: str, k: int, known_items: set[str] | None, baseline: str | None = None, seed: int = 0, resamples: int = RESAMPLES) -> Report:
    """The report from the raw clicks and recommendations (stream.replay.score_online pairs them).

    The arms are compared with ``baseline`` (default: the arm with the most sessions, the champion of a
    typical split; ties by name)."""
    import orjson

    from stream.replay import score_online

    ranks: list[tuple[str, str | None, int]] = []
    score_online(click_values, recommendation_values, (k,), known_items, ranks_out=ranks, experiment=experiment)
    sessions: dict[str, set[str]] = defaultdict(set)
    for value in recommendation_values:
        doc = orjson.loads(value)
        if doc.get("experiment") == experiment and doc.get("arm") is not None:
            sessions[doc["arm"]].add(doc["session_id"])
    if baseline is not None and baseline not in sessions:
        raise UserError(f"--baseline {baseline}: no answer of experiment '{experiment}' names that arm (arms seen: {', '.join(sorted(sessions)) or 'none'})")
    order = sorted(sessions, key=lambda a: (a != baseline, -len(sessions[a]), a))
    by_arm: dict[str, dict[str, list[int]]] = {a: defaultdict(list) for a in order}
    unassigned = 0
    for session_id, arm, rank in ranks:
        if arm is None or arm not in by_arm:
            unassigned += 1
            continue
        by_arm[arm][session_id].append(rank)
    samples = [per_session(a, len(sessions[a]), by_arm[a], k) for a in order]
    return report(experiment, samples, k, unassigned, seed, resamples)
