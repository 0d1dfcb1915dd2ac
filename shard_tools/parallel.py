"""Ordered parallel map over a source's files, with a progress bar and bounded memory.

The source is installed once per worker process (fork), not pickled per task; job functions
read it with `worker_source()`. At most `window` results are in flight: the main process,
which writes them, never holds more than that many (each at most one file's worth), however
far ahead the workers could run. Workers ignore Ctrl-C and die quietly on SIGTERM: the main
process handles both and stops them.
"""

from __future__ import annotations

import itertools
import signal
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import get_context

from tqdm import tqdm

from .source import Source

_SOURCE: Source | None = None


def quiet_worker() -> None:
    """Pool initializer: Ctrl-C and SIGTERM are the main process's to handle (it stops the
    pool); a worker ignores the first and dies of the second without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _init_worker(src: Source) -> None:
    global _SOURCE
    _SOURCE = src
    quiet_worker()


def worker_source() -> Source:
    """The source installed in this worker."""
    assert _SOURCE is not None, "worker_source() called outside pool_map"
    return _SOURCE


@contextmanager
def pool_map(fn: Callable, jobs: list, src: Source, workers: int, desc: str,
             window: int = 0) -> Iterator[Iterator]:
    """`with pool_map(...) as results:` yields fn(job) for each job, in order (inline when one
    worker is asked for). Leaving the block, normally or by an exception, stops the workers and
    clears the progress bar before anything else is printed.

    `window`: results in flight at most (default 4 per worker).
    """
    global _SOURCE
    with tqdm(total=len(jobs), desc=desc, unit="img", dynamic_ncols=True, leave=False) as bar:
        if workers <= 1:
            _SOURCE = src
            yield (_counted(fn(job), bar) for job in jobs)
            return
        with get_context("fork").Pool(workers, _init_worker, (src,)) as pool:
            yield _windowed(pool, fn, iter(jobs), window or 4 * workers, bar)


def _counted(result, bar: tqdm):
    bar.update()
    return result


def _windowed(pool, fn: Callable, todo: Iterator, window: int, bar: tqdm) -> Iterator:
    pending = deque(pool.apply_async(fn, (j,)) for j in itertools.islice(todo, window))
    while pending:
        result = pending.popleft().get()
        for j in itertools.islice(todo, 1):
            pending.append(pool.apply_async(fn, (j,)))
        yield _counted(result, bar)
