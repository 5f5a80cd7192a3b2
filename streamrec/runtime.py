"""Process-wide settings, made once at process start and nowhere else.

Torch's and faiss's CPU thread counts and glibc's allocator are state of the whole process: set from a
library call they change what every other user of that library in the process gets, and set from a
thread (a hot swap loads its bundle in one) they race with whoever is computing. So a program sets
them once, first thing: each `streamrec` command that computes (train, export, retrain, the demo), the
worker (``stream.worker.serve``) and the benchmarks call ``configure_process``; libraries
(``training.trainer.fit``, the scorers, the exporter, a swap) never do.

Torch and faiss are imported only by the code that needs them (a worker serving ONNX never loads
torch), so the thread count is applied to each when it is loaded: code that uses one imports it
through ``torch()`` / ``faiss()``, which apply the process's count the first time and never again.
"""

from __future__ import annotations

import ctypes
import importlib
import sys

_threads: int | None = None  # the process's CPU threads for torch and faiss; None: each library's default
_applied: set[str] = set()  # the libraries the count has been applied to


def configure_process(threads: int | None = None, *, keep_freed_memory: bool = False, load: tuple[str, ...] = ("torch",)) -> None:
    """Once, at process start: ``threads`` CPU threads for torch (intra-op) and faiss (OpenMP), and with
    ``keep_freed_memory`` glibc keeps freed memory (for training; see ``_keep_freed_memory``).

    ``load``: the libraries the program uses for sure, imported and configured now (training and export
    use torch); the worker passes none, and a library it loads later (a torch-served bundle, an ann
    index) is configured when ``torch()`` / ``faiss()`` first import it.
    """
    global _threads
    _threads = threads
    _applied.clear()
    for name in ("torch", "faiss"):
        if name in load or name in sys.modules:  # used for sure, or loaded already: apply now
            _configured(name)
    if keep_freed_memory:
        _keep_freed_memory()


def torch():
    """``import torch``, with the process's thread count applied the first time."""
    return _configured("torch")


def faiss():
    """``import faiss``, with the process's thread count applied the first time."""
    return _configured("faiss")


def _configured(name: str):
    module = importlib.import_module(name)
    if name not in _applied:
        _applied.add(name)
        if _threads is not None:
            if name == "torch":
                module.set_num_threads(_threads)
            else:
                module.omp_set_num_threads(_threads)
    return module


def release_free_heap() -> bool:
    """Give the pages of glibc's free heap chunks back to the OS (``malloc_trim(0)``); False without glibc.

    A long-running worker frees and re-allocates session states, record batches and scan lists of every
    size in the event loop's thread, which glibc serves from its main heap. Freed chunks stay in the heap
    and the heap only shrinks from its top, so the free space between live chunks grows with churn (the
    multi-hour soak: in-use memory flat, the heap's RSS creeping by about 4 MB an hour, docs/reliability.md).
    ``malloc_trim`` also releases whole free pages inside the heap (MADV_DONTNEED), so RSS follows what is in
    use; the chunks stay glibc's and are faulted back in when reused. Called by the worker after each expiry
    pass (``stream.worker``), not from any library code.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS.

    A training step frees and re-allocates the same large tensors every step; by default glibc
    unmaps them and each new tensor then pays a page fault per 4 KiB page, which is slow (very slow in
    VMs). Keeping freed blocks in the heap removes that cost. No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: largest allowed, so tensors come from the heap
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass
