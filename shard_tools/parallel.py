"""Ordered parallel map over a source's files, with a progress bar.

The source is installed once per worker process (fork), not pickled per task; job functions
read it with `worker_source()`.
"""

from __future__ import annotations

from multiprocessing import get_context

from tqdm import tqdm

from .source import Source

_SOURCE: Source | None = None


def _init_worker(src: Source) -> None:
    global _SOURCE
    _SOURCE = src


def worker_source() -> Source:
    """The source installed in this worker."""
    assert _SOURCE is not None, "worker_source() called outside pool_map"
    return _SOURCE


def pool_map(fn, jobs: list, src: Source, workers: int, desc: str):
    """Yield fn(job) for each job, in order; inline when one worker is asked for."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", dynamic_ncols=True, leave=False)
    if workers <= 1:
        _init_worker(src)
        for job in jobs:
            yield fn(job)
            bar.update()
    else:
        with get_context("fork").Pool(workers, _init_worker, (src,)) as pool:
            for res in pool.imap(fn, jobs, chunksize=4):
                yield res
                bar.update()
    bar.close()
