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


def test_releasing_the_free_heap_gives_the_pages_between_live_chunks_back_to_the_os():
    """The worker's creep was free space inside glibc's main heap (docs/reliability.md): a heap with
    64 MB freed between live chunks keeps those pages resident until release_free_heap trims them."""
    out = run(
        "import ctypes\n"
        "from streamrec import runtime\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def heap_kb():\n"
        "    kb, inside = 0, False\n"
        "    for line in open('/proc/self/smaps'):\n"
        "        head = line.split(' ', 1)[0]\n"
        "        if '-' in head and not line[0].isupper():\n"
        "            inside = line.rstrip().endswith('[heap]')\n"
        "        elif inside and line.startswith('Rss:'):\n"
        "            kb += int(line.split()[1])\n"
        "    return kb\n"
        "chunks = [libc.malloc(16384) for _ in range(4096)]\n"
        "for c in chunks:\n"
        "    ctypes.memset(c, 1, 16384)\n"
        "for i, c in enumerate(chunks):\n"
        "    if i % 16:\n"
        "        libc.free(c)  # every 16th chunk stays: the freed space is inside the heap, not at its top\n"
        "before = heap_kb()\n"
        "released = runtime.release_free_heap()\n"
        "print(released, before, heap_kb())\n"
    )
    released, before, after = out.split()
    assert released == "True"
    assert int(before) - int(after) > 32 * 1024, (before, after)  # of the 60 MB freed, most pages went back
