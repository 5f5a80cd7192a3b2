"""`streamrec export` (run -> verified bundle) and `streamrec bundle inspect|verify`."""

from __future__ import annotations

from pathlib import Path

import click

from export import defaults
from streamrec.runtime import configure_process


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory from `streamrec train`.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None, help="Prepared DATA_DIR (default: the one the run was trained on).")
@click.option("--k", type=click.IntRange(min=1), default=defaults.K, show_default=True, help="Recommendations per answer.")
@click.option("--history-len", type=int, default=None, help=f"Items kept per session for exclude_seen (hidden/items kinds; default {defaults.SEEN_HISTORY}). Window models use their own window.")
@click.option("--int8", is_flag=True, help="Quantize the ONNX model to int8 (dynamic) after measuring its top-K overlap with fp32.")
@click.option("--min-overlap", type=click.FloatRange(0, 1), default=defaults.MIN_OVERLAP, show_default=True, help="Refuse an int8 model whose top-K overlap with fp32 is lower.")
@click.option("--parity-sessions", type=click.IntRange(min=1), default=defaults.PARITY_SESSIONS, show_default=True, help="Test sessions replayed for the parity check.")
@click.option("--threads", type=click.IntRange(min=1), default=defaults.THREADS, show_default=True, help="CPU threads for export checks.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--retrieval", type=click.Choice(["exact", "ann"]), default=defaults.RETRIEVAL, show_default=True, help="exact: score the whole catalogue; ann: take candidates from a faiss index and re-score them exactly (big catalogues; neural models).")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=defaults.MIN_RECALL, show_default=True, help="ann: refuse an index whose top-K recall against exact scoring on test prefixes is lower.")
@click.option("--candidates", type=int, default=None, help=f"ann: candidates taken from the index per answer and re-scored exactly (default: {defaults.CANDIDATES}, raised up to {defaults.MAX_CANDIDATES} by the export when even its deepest search falls short of --min-recall; at least K + history_len).")
@click.option("--ann-index", type=click.Choice(list(defaults.ANN_INDEXES)), default=None, help=f"ann: faiss index kind (default {defaults.ANN_INDEX}; ivfpq: IVF over 4-bit PQ fast-scan codes, ivf: IVF-Flat).")
@click.option("--ann-m", type=int, default=None, help=f"hnsw: links per node (default {defaults.HNSW_M}).")
@click.option("--ann-ef-construction", type=int, default=None, help=f"hnsw: build-time search width (default {defaults.HNSW_EF_CONSTRUCTION}).")
@click.option("--ann-ef-search", type=int, default=None, help=f"hnsw: query-time search width (default: from {defaults.HNSW_EF_SEARCH}, raised by the export until --min-recall is met; never below --candidates).")
@click.option("--ann-nlist", type=int, default=None, help="ivf, ivfpq: inverted lists (default 4 * sqrt(n_items), at most n_items / 39).")
@click.option("--ann-metric", type=click.Choice(list(defaults.ANN_METRICS)), default=None, help=f"ann: how the index searches (default {defaults.ANN_METRIC}); l2 asks the inner-product search as an L2 one after one extra coordinate per item (better recall on trained embeddings).")
@click.option("--ann-nprobe", type=int, default=None, help=f"ivf, ivfpq: lists scanned per query (default: from {defaults.IVFPQ_NPROBE} for ivfpq, {defaults.IVF_NPROBE} for ivf, raised by the export until --min-recall is met; a value given is kept).")
def export(run_dir: Path, out: Path, **options) -> None:
    """Export a trained run as a verified bundle (parity-checked against the trained model)."""
    from export.exporter import export_run

    configure_process(threads=options["threads"])
    export_run(run_dir, out, log=lambda line: click.echo(line, err=True), **options)


@click.group()
def bundle() -> None:
    """Look at exported bundles."""


@bundle.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest JSON.")
def inspect(bundle_dir: Path, as_json: bool) -> None:
    """Verify a bundle's checksums and print its manifest."""
    import json

    from export.bundle import format_manifest, open_bundle

    opened = open_bundle(bundle_dir)
    if as_json:
        click.echo(json.dumps(opened.manifest, indent=2))
        return
    click.echo(f"{bundle_dir}: {len(opened.manifest['files'])} files, checksums ok")
    click.echo(format_manifest(opened.manifest))


@bundle.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def verify(bundle_dir: Path) -> None:
    """Check a bundle (checksums, schema version, vocabulary) and load its scorer; one line out."""
    from export.scorer import load_scorer

    scorer = load_scorer(bundle_dir)
    retrieval = scorer.retrieval["mode"] + (f" {scorer.retrieval['index']}" if scorer.ann is not None else "")
    click.echo(f"{bundle_dir}: ok ({scorer.model}, {scorer.kind}, {scorer.n_items:,} items, {retrieval} retrieval, version {scorer.model_version})")
