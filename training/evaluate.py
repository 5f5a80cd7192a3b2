"""Full-ranking offline evaluation: every target is ranked against the whole catalogue.

No sampled negatives. For each evaluated position the model's score row over
items 1..n_items (column 0 ignored) is compared with the target's score.

Rules, chosen to match what the stream does and to avoid flattering a model:
- Ties are ranked conservatively: rank = number of items (other than column 0)
  whose score is >= the target's, i.e. the target comes after every item it
  ties with. The optimistic rank (1 + number strictly greater) is reported as
  ``<metric>_optimistic``; a model that scores many items equally shows a gap.
- A target that was unseen in training (index 0) cannot be recommended by any
  model: it is skipped and counted in ``n_skipped``.
- An unknown input item (index 0) leaves the session state unchanged and the
  stream answers it with the popularity ranking, so when ``popularity`` (train
  item counts, [n_items + 1]) is given the prediction for such a position is
  the popularity ranking. Without ``popularity`` the model's own row is used.
- ``mode="next"`` evaluates every position that has a next event (targets are
  ``items[p + 1]``); ``mode="last"`` only the last target of each session
  (leave-one-out protocols). Models that offer ``score_positions(sessions,
  positions, batch_size)`` (the non-neural baselines, the window models and
  GRU4Rec, which still steps through every click but ranks only the wanted
  positions) are asked for the evaluated positions only; others go through
  ``score_next`` and the rest is dropped. In "last" mode that is most of the
  cost: on Amazon Beauty 40,226 of 313,736 positions are evaluated.
- ``exclude_seen=True`` removes the session's own items up to the evaluated
  position from the ranking (their scores become -inf), as Klenitskiy &
  Vasilev's ``filter_seen`` and the stream's exclude-seen do; a target that
  repeats one of them is then a miss. Off by default: session-based data has
  real repeats, and the figures in docs/results.md say which setting they use.
- Memory is bounded by ``score_budget`` (score cells per batch, default
  ``SCORE_BUDGET``): the model is asked for at most
  ``score_budget // (n_items + 1)`` rows at a time (at least one), so the
  [batch, n_items + 1] score matrix and the comparisons over it stay a fixed
  size however large the catalogue or ``batch_size``. Events are ranked one
  row at a time, so the metrics do not depend on the batching.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from streamrec.errors import UserError
from training.models.base import next_positions
from training.sessions import Sessions

SCORE_BUDGET = 2**25  # score cells per evaluated batch (128 MiB of float32): 33 rows at 1M items, 512 up to 65k items
LENGTH_BUCKETS = ((2, 2), (3, 3), (4, 4), (5, 5), (6, 7), (8, 9), (10, 14), (15, 19), (20, None))


def bucket_label(lo: int, hi: int | None) -> str:
    """A bucket's name: "4", "5-6", or "20+" where it has no upper end (``hi`` None)."""
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def in_bucket(values: np.ndarray, lo: int, hi: int | None) -> np.ndarray:
    """Where ``values`` lie in [lo, hi] (no upper end where ``hi`` is None)."""
    return (values >= lo) & (values <= (hi if hi is not None else np.iinfo(np.int64).max))


def score_rows(n_items: int, batch_size: int, score_budget: int = SCORE_BUDGET) -> int:
    """Rows of a [rows, n_items + 1] score batch that keep it within ``score_budget`` cells (at least one row)."""
    if batch_size < 1 or score_budget < 1:
        raise UserError(f"batch size and score budget must be positive, got {batch_size} and {score_budget}")
    return max(1, min(batch_size, score_budget // (n_items + 1)))


def evaluation_positions(sessions: Sessions, mode: str) -> np.ndarray:
    """Flat event indices whose next item is a target under ``mode``."""
    if mode == "next":
        return next_positions(sessions)
    if mode == "last":
        lengths = sessions.lengths
        return sessions.offsets[1:][lengths >= 2] - 2
    raise UserError(f"unknown evaluation mode '{mode}' (known: next, last)")


def ranks(scores: np.ndarray | torch.Tensor, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(conservative, optimistic) 1-based ranks of ``targets`` in each score row.

    Column 0 is ignored. NaN scores never rank above the target; a NaN target
    ranks last. (numpy: its comparisons and row sums are several times faster
    than torch's on CPU here; scores on a GPU are ranked there, by ``ranks_torch``.)
    """
    if isinstance(scores, torch.Tensor) and scores.device.type != "cpu":
        return ranks_torch(scores, targets)
    s = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    rows = np.arange(len(s))
    target_score = s[rows, targets][:, None]
    conservative = (s >= target_score).sum(1) - (s[:, 0] >= target_score[:, 0])  # includes the target itself
    optimistic = (s > target_score).sum(1) - (s[:, 0] > target_score[:, 0]) + 1
    nan = np.isnan(target_score[:, 0])
    conservative[nan] = optimistic[nan] = s.shape[1] - 1
    return conservative.astype(np.int64), optimistic.astype(np.int64)


def ranks_torch(scores: torch.Tensor, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ranks`` computed with torch where the scores are (a GPU): only the [rows] ranks cross to the host."""
    rows = torch.arange(len(scores), device=scores.device)
    target_score = scores[rows, torch.as_tensor(targets, device=scores.device)][:, None]
    conservative = (scores >= target_score).sum(1) - (scores[:, 0] >= target_score[:, 0]).long()
    optimistic = (scores > target_score).sum(1) - (scores[:, 0] > target_score[:, 0]).long() + 1
    nan = torch.isnan(target_score[:, 0])
    conservative[nan] = optimistic[nan] = scores.shape[1] - 1
    return conservative.cpu().numpy().astype(np.int64), optimistic.cpu().numpy().astype(np.int64)


def top_k(scores: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Item indices of the k best scores per row (column 0 excluded, NaN as -inf), best first."""
    s = torch.as_tensor(scores)[:, 1:]
    top = s.topk(min(k, s.shape[1]), dim=1)
    if torch.isnan(top.values).any():  # topk puts NaN first; only then pay for a cleaned copy
        top = torch.nan_to_num(s, nan=-math.inf).topk(min(k, s.shape[1]), dim=1)
    return (top.indices + 1).numpy()


def _diversity(top: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Intra-list diversity per row: mean pairwise dissimilarity of a top-K list.

    Categorical features [n_items + 1]: share of pairs in different categories.
    Embeddings [n_items + 1, d]: mean pairwise cosine distance.
    """
    k = top.shape[1]
    if k < 2:
        return np.zeros(len(top))
    if features.ndim == 1:
        c = features[top]
        same = (c[:, :, None] == c[:, None, :]).sum((1, 2)) - k
    else:
        e = torch.as_tensor(features[top], dtype=torch.float32)
        e = torch.nn.functional.normalize(e, dim=-1)
        gram = e @ e.transpose(1, 2)
        same = (gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(1)).numpy()
    return 1.0 - same / (k * (k - 1))


def evaluate(
    model,
    sessions: Sessions,
    *,
    ks: tuple[int, ...] = (5, 10, 20),
    mode: str = "next",
    popularity: np.ndarray | None = None,
    item_features: np.ndarray | dict[str, np.ndarray] | None = None,
    batch_size: int = 512,
    progress: bool = True,
    exclude_seen: bool = False,
    score_budget: int = SCORE_BUDGET,
    event_ranks: bool = False,
) -> dict:
    """Full-ranking metrics of ``model`` on ``sessions`` (see module docstring for the rules).

    Returns HR@K (= Recall@K with one target), MRR@K, NDCG@K and their
    ``_optimistic`` variants, coverage@K (share of the catalogue that appears in
    some top-K), popularity@K (mean popularity of recommended items, counts
    normalised by the largest count; needs ``popularity``), diversity@K when
    ``item_features`` are given, ``n_events``, ``n_skipped``,
    ``n_unknown_inputs`` and ``by_length`` (metrics at the largest K per
    session-length bucket). ``batch_size`` is lowered to keep each score batch
    within ``score_budget`` cells (``score_rows``). With ``event_ranks`` it also
    returns each evaluated event's conservative rank (``event_ranks``) and
    position in ``sessions`` (``event_positions``), sorted by position, for
    paired comparisons of two models on the same events.
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise UserError(f"cut-offs must be positive integers, got {ks}")
    n_items = int(model.n_items)
    kmax = ks[-1]
    if popularity is not None:
        popularity = np.asarray(popularity, dtype=np.float64)
        if popularity.shape != (n_items + 1,):
            raise UserError(f"popularity has shape {popularity.shape}, expected ({n_items + 1},) for {n_items} items")
    if isinstance(item_features, np.ndarray):
        item_features = {"": item_features}
    for name, f in (item_features or {}).items():
        if len(f) != n_items + 1:
            raise UserError(f"item feature '{name}' has {len(f)} rows, expected {n_items + 1}")

    batch_size = score_rows(n_items, batch_size, score_budget)
    positions_wanted = evaluation_positions(sessions, mode)
    wanted = np.zeros(sessions.n_events, dtype=bool)
    wanted[positions_wanted] = True
    next_items = np.append(sessions.items[1:], 0)
    if sessions.items.max(initial=0) > n_items:
        raise UserError(f"sessions contain item index {sessions.items.max()} but the model knows {n_items} items")
    session_length = np.repeat(sessions.lengths, sessions.lengths)

    cons_all, opt_all, pos_all = [], [], []
    covered = {k: np.zeros(n_items + 1, dtype=bool) for k in ks}
    # per-event list means, averaged at the end: the figures do not depend on how events were batched
    pop_rows: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    div_rows: dict[tuple[int, str], list[np.ndarray]] = {(k, name): [] for k in ks for name in (item_features or {})}
    n_skipped = 0
    n_unknown = 0
    pop_norm = popularity / popularity[1:].max() if popularity is not None and n_items and popularity[1:].max() > 0 else popularity
    if hasattr(model, "score_positions"):  # scores only the evaluated positions (last mode: one per session)
        batches = model.score_positions(sessions, positions_wanted, batch_size=batch_size)
        total_batches = math.ceil(len(positions_wanted) / batch_size)
    else:
        batches = model.score_next(sessions, batch_size=batch_size)
        total_batches = math.ceil(len(next_positions(sessions)) / batch_size)
    for positions, scores in tqdm(batches, total=total_batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        positions = np.asarray(positions, dtype=np.int64)
        keep = wanted[positions]
        targets = next_items[positions]
        n_skipped += int((keep & (targets == 0)).sum())
        keep &= targets > 0
        if not keep.any():
            continue
        scores = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != n_items + 1:
            raise UserError(f"model returned scores of shape {scores.shape}, expected [batch, {n_items + 1}]")
        if len(scores) > batch_size:
            raise UserError(f"model returned {len(scores)} score rows for a batch of {batch_size}")
        copied = not keep.all()
        if copied:
            positions, targets, scores = positions[keep], targets[keep], scores[keep]
        unknown = sessions.items[positions] == 0
        n_unknown += int(unknown.sum())
        if popularity is not None and unknown.any():
            scores = scores if copied else scores.copy()  # the model's array is left alone
            copied = True
            scores[unknown] = popularity
        if exclude_seen:
            scores = scores if copied else scores.copy()
            rows, items = seen_items(sessions, positions)
            scores[rows, items] = -np.inf
        cons, opt = ranks(scores, targets)
        cons_all.append(cons)
        opt_all.append(opt)
        pos_all.append(positions)
        top = top_k(scores, kmax)
        for k in ks:
            covered[k][top[:, :k]] = True
            if pop_norm is not None:
                pop_rows[k].append(pop_norm[top[:, :k]].mean(1))
            for name, f in (item_features or {}).items():
                div_rows[(k, name)].append(_diversity(top[:, :k], f))

    cons = np.concatenate(cons_all) if cons_all else np.zeros(0, dtype=np.int64)
    opt = np.concatenate(opt_all) if opt_all else np.zeros(0, dtype=np.int64)
    pos = np.concatenate(pos_all) if pos_all else np.zeros(0, dtype=np.int64)
    n = len(cons)
    out: dict = {}
    for suffix, r in (("", cons), ("_optimistic", opt)):
        out.update(rank_metrics(r, ks, suffix))
    for k in ks:
        out[f"coverage@{k}"] = float(covered[k][1:].mean()) if n_items else 0.0
        if pop_norm is not None:
            out[f"popularity@{k}"] = float(np.concatenate(pop_rows[k]).mean()) if n else 0.0
        for name in item_features or {}:
            out[f"diversity@{k}" + (f"_{name}" if name else "")] = float(np.concatenate(div_rows[(k, name)]).mean()) if n else 0.0
    out["n_events"] = n
    out["n_skipped"] = n_skipped
    out["n_unknown_inputs"] = n_unknown
    out["mode"] = mode
    out["exclude_seen"] = exclude_seen
    lengths = session_length[pos]
    by_length = []
    for lo, hi in LENGTH_BUCKETS:
        m = in_bucket(lengths, lo, hi)
        if m.any():
            row = {"length": bucket_label(lo, hi), "n_events": int(m.sum())}
            row.update(rank_metrics(cons[m], (kmax,), ""))
            by_length.append(row)
    out["by_length"] = by_length
    if event_ranks:
        order = np.argsort(pos, kind="stable")
        out["event_ranks"], out["event_positions"] = cons[order], pos[order]
    return out


def seen_items(sessions: Sessions, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs: for row j, every item of its session from the start up to ``positions[j]``."""
    owner = np.searchsorted(sessions.offsets, positions, side="right") - 1
    start = sessions.offsets[owner]
    counts = positions - start + 1
    rows = np.repeat(np.arange(len(positions)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, sessions.items[np.repeat(start, counts) + within]


def rank_metrics(r: np.ndarray, ks: tuple[int, ...], suffix: str = "") -> dict[str, float]:
    """HR@K, MRR@K and NDCG@K from 1-based ranks (one relevant item per event)."""
    out = {}
    n = len(r)
    for k in ks:
        hit = r <= k
        out[f"HR@{k}{suffix}"] = float(hit.mean()) if n else 0.0
        out[f"MRR@{k}{suffix}"] = float(np.where(hit, 1.0 / r, 0.0).mean()) if n else 0.0
        out[f"NDCG@{k}{suffix}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean()) if n else 0.0
    return out


def format_table(metrics: dict) -> str:
    """Metrics as a fixed-width text table (optimistic figures shown only where they differ)."""
    ks = sorted(int(key.split("@")[1]) for key in metrics if key.startswith("HR@") and key[3:].isdigit())
    lines = [f"events evaluated: {metrics.get('n_events', 0):,}   skipped (target unseen in training): {metrics.get('n_skipped', 0):,}   unknown inputs: {metrics.get('n_unknown_inputs', 0):,}"]
    extra = [c for c in ("coverage", "popularity", "diversity") if any(key.startswith(f"{c}@") for key in metrics)]
    header = ["K", "HR", "MRR", "NDCG"] + extra
    rows = []
    for k in ks:
        row = [str(k)]
        for m in ("HR", "MRR", "NDCG"):
            v, o = metrics[f"{m}@{k}"], metrics.get(f"{m}@{k}_optimistic", metrics[f"{m}@{k}"])
            row.append(f"{v:.4f}" + (f" (opt {o:.4f})" if abs(o - v) > 5e-5 else ""))
        for c in extra:
            vals = [f"{metrics[key]:.4f}" for key in sorted(metrics) if key == f"{c}@{k}" or key.startswith(f"{c}@{k}_")]
            row.append(" ".join(vals) if vals else "-")
        rows.append(row)
    lines += _grid(header, rows)
    if metrics.get("by_length"):
        kmax = ks[-1]
        lines.append("")
        lines.append(f"by session length (conservative ties, K={kmax}):")
        rows = [[b["length"], f"{b['n_events']:,}", f"{b[f'HR@{kmax}']:.4f}", f"{b[f'MRR@{kmax}']:.4f}", f"{b[f'NDCG@{kmax}']:.4f}"] for b in metrics["by_length"]]
        lines += _grid(["length", "events", "HR", "MRR", "NDCG"], rows)
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
