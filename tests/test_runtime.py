"""Process-wide settings (streamrec.runtime): set once at process start, and no library call sets them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_process_thread_count_reaches_torch_whether_loaded_before_or_after():
    before = run("import torch; from streamrec.runtime import configure_process; configure_process(threads=1); print(torch.get_num_threads())")
    after = run("from streamrec import runtime; runtime.configure_process(threads=1); torch = runtime.torch(); print(torch.get_num_threads())")
    assert before == after == "1"


def test_the_worker_configures_torch_without_loading_it():
    """A worker serving ONNX never loads torch: its configure_process (load=()) leaves it unloaded, and a
    torch-served bundle swapped in later gets the count when the scorer imports it (runtime.torch())."""
    out = run(
        "import sys\n"
        "from streamrec import runtime\n"
        "runtime.configure_process(threads=1, load=())\n"
        "loaded = 'torch' in sys.modules\n"
        "print(loaded, runtime.torch().get_num_threads())\n"
    )
    assert out == "False 1"


def test_no_library_sets_process_wide_state():
    """Only streamrec/runtime.py calls mallopt or sets torch's or faiss's thread count for the process
    (export.retrieval.build_index sets faiss's for the build and puts it back)."""
    offenders = []
    for path in [*REPO.glob("training/**/*.py"), *REPO.glob("export/*.py"), *REPO.glob("stream/*.py")]:
        text = path.read_text()
        for needle in (r"(?<!omp_)set_num_threads\(", r"set_num_interop_threads\(", r"mallopt\("):
            if re.search(needle, text):
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
        if "omp_set_num_threads(" in text and path.name != "retrieval.py":
            offenders.append(f"{path.relative_to(REPO)}: omp_set_num_threads(")
    assert not offenders, offenders
