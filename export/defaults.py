"""The defaults of ``export_run`` and `streamrec export`, in one place light enough for the CLI to import (no numpy, no torch)."""

K = 20  # recommendations per answer
SEEN_HISTORY = 50  # hidden / items kinds: recent items kept per session for exclude_seen
MIN_OVERLAP = 0.9  # least top-K overlap of an int8 model with fp32
PARITY_SESSIONS = 200  # test sessions replayed for the parity check
THREADS = 1  # CPU threads for the export checks
