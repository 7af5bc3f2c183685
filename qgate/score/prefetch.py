"""Decode ahead: the next series is claimed and decoded while the current one is scored.

:class:`Prefetcher` keeps up to ``depth`` items claimed ahead of the consumer: each of its
``depth`` threads claims one item (``source``), prepares it (``prepare``) and hands it
over (:meth:`Prefetcher.get`); the consumer's ``get`` frees the slot for the next claim.
The worker (:mod:`qgate.score.worker`) claims jobs with it and decodes their series with
a :class:`SeriesDecoder`; ``benchmarks/score.py`` streams series through the same two.

:class:`SeriesDecoder` loads a series (:func:`qgate.score.volume.load_series`) in the calling
thread, or in a pool of decoder processes (DICOM parsing is Python and holds the
interpreter lock, so threads do not add decode speed; the volume comes back through
shared memory). For a CUDA scoring device the volume is made in page-locked memory and
copied to the device on a stream of its own, in the decode thread, so the copy overlaps
the previous series' model work: scorers read :attr:`SeriesVolume.device_hu` and copy
nothing more (:mod:`qgate.score.scorers.learned`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from qgate.core.config import Settings
from qgate.core.families import FAMILY_NAMES
from qgate.score.idle import IdlePoll
from qgate.score.scorers.base import SeriesVolume
from qgate.score.volume import Allocator, LoadedSeries, empty_volume, load_series

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Decoder processes on CUDA when ``queue.decode_processes`` is unset: half the cores, at most.
MAX_AUTO_DECODERS = 8


class Prefetcher(Generic[T, R]):
    """Up to ``depth`` items claimed and prepared ahead, by ``depth`` threads.

    Parameters
    ----------
    source : callable
        Claims the next item; None when there is none. The threads claim through
        ``idle`` (:class:`~qgate.score.idle.IdlePoll`): while the source is empty only
        one of them asks again, at most every ``poll_seconds``.
    prepare : callable
        Turns a claimed item into what the consumer takes. It must not raise: an error
        belongs in what it returns (the item it holds would otherwise be lost until its
        lease lapses); one that escapes is logged and the item dropped.
    depth : int
        Items claimed and not yet taken by :meth:`get`, at most (>= 1).
    idle : IdlePoll, optional
        Shared with the other claimers of the process (the worker's); default: one of
        this prefetcher's own.
    """

    def __init__(
        self,
        source: Callable[[], T | None],
        prepare: Callable[[T], R],
        *,
        depth: int,
        poll_seconds: float,
        name: str,
        idle: IdlePoll | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source, self._prepare, self._poll = source, prepare, poll_seconds
        self._idle = idle or IdlePoll(poll_seconds=poll_seconds)
        self._slots = threading.Semaphore(depth)
        self._ready: queue.Queue[R] = queue.Queue()
        self._stop = threading.Event()
        # Consumers blocked in get(), and items promised to them (reserve_consumer).
        self._lock = threading.Lock()
        self._waiting = self._promised = 0
        self._mine = threading.local()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-ahead-{i}", daemon=True)
            for i in range(depth)
        ]

    def start(self) -> Prefetcher[T, R]:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=self._poll):
                continue
            item = self._idle.claim(self._source, self._stop)
            if item is None:  # stopping
                self._slots.release()
                continue
            try:
                self._ready.put(self._prepare(item))
            except Exception:
                log.exception("preparing %r failed; dropped", item)
                self._slots.release()
            finally:
                if getattr(self._mine, "promised", False):
                    self._mine.promised = False
                    with self._lock:
                        self._promised -= 1

    def reserve_consumer(self) -> bool:
        """From ``prepare``: True when a consumer is waiting in :meth:`get` with nothing
        ready or promised to it, so the item being prepared goes straight to it (it is
        promised until handed over); False when the item will wait."""
        with self._lock:
            if self._waiting > self._ready.qsize() + self._promised:
                self._promised += 1
                self._mine.promised = True
                return True
            return False

    def get(self, timeout: float) -> R | None:
        """The next prepared item, waiting up to ``timeout`` seconds; None if none came."""
        with self._lock:
            self._waiting += 1
        try:
            item = self._ready.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            with self._lock:
                self._waiting -= 1
        self._slots.release()
        return item

    def close(self) -> list[R]:
        """Stop claiming, finish the items being prepared; returns those not taken."""
        self._stop.set()
        self._idle.wake()
        for t in self._threads:
            t.join()
        left: list[R] = []
        while True:
            try:
                left.append(self._ready.get_nowait())
            except queue.Empty:
                return left


@dataclass(frozen=True)
class PipelineShape:
    """How a worker overlaps decode and model work (``queue.prefetch``,
    ``queue.decode_processes`` resolved for the scoring device)."""

    #: Series claimed and decoded ahead of the one being scored; 0: none.
    prefetch: int
    #: Decoder processes; 0: decode in the worker process's prefetch threads.
    decode_processes: int
    #: The device the volume is staged on, or None: the scorers read host memory.
    device: torch.device | None


def pipeline_shape(settings: Settings) -> PipelineShape:
    """Resolve the worker's decode settings.

    On CPU: one series ahead, decoded in a thread (decoding is a small part of the
    models' CPU time; a process would only add copies). On CUDA (a learned scorer on a
    CUDA ``scoring.device``): half the cores as decoder processes (at most
    :data:`MAX_AUTO_DECODERS`), as many series ahead, volumes staged on the device.
    """
    q = settings.queue
    learned = any(name in FAMILY_NAMES for name in settings.scoring.scorers)
    device = None
    if learned and settings.scoring.device != "cpu":
        from qgate.score.scorers.learned import resolve_device

        resolved = resolve_device(settings.scoring.device)
        device = resolved if resolved.type == "cuda" else None
    if device is None:
        decoders = q.decode_processes or 0
    elif q.decode_processes is None:
        decoders = max(1, min(MAX_AUTO_DECODERS, (os.cpu_count() or 2) // 2))
    else:
        decoders = q.decode_processes
    prefetch = q.prefetch if q.prefetch is not None else max(1, decoders)
    return PipelineShape(prefetch=prefetch, decode_processes=decoders, device=device)


def _pinned(shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 volume in page-locked host memory (torch's caching host allocator)."""
    import torch

    return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()


def _decode_shared(paths: Sequence[str]) -> tuple[str, tuple[int, int, int], LoadedSeries]:
    """In a decoder process: load a series into a new shared-memory block.

    Returns the block's name, the volume's shape and the series with an empty
    ``(slices, 0, 0)`` volume in place of the voxels; the caller copies the voxels out and
    unlinks the block.
    """
    blocks: list[SharedMemory] = []

    def allocate(shape: tuple[int, int, int]) -> np.ndarray:
        shm = SharedMemory(create=True, size=max(1, math.prod(shape) * 4))
        blocks.append(shm)
        return np.ndarray(shape, dtype=np.float32, buffer=shm.buf)

    try:
        loaded = load_series(paths, allocate=allocate)
    except BaseException:
        for shm in blocks:
            _release(shm, unlink=True)
        raise
    (shm,) = blocks
    shape = loaded.volume.hu.shape
    n = shape[0]
    loaded.volume = replace(loaded.volume, hu=np.empty((n, 0, 0), dtype=np.float32))
    _release(shm, unlink=False)
    return shm.name, (n, shape[1], shape[2]), loaded


def _release(shm: SharedMemory, *, unlink: bool) -> None:
    with contextlib.suppress(BufferError):  # a view still alive (a traceback's): unmapped at exit
        shm.close()
    if unlink:
        shm.unlink()


class SeriesDecoder:
    """Loads series for the scorers, in this thread or in decoder processes.

    Parameters
    ----------
    processes : int
        Decoder processes (started on first use, spawned: they import no torch); 0: decode
        in the calling thread.
    device : torch.device, optional
        A CUDA device to stage each volume on (page-locked host memory, then an
        asynchronous copy on a stream of this decoder's). None: host memory only.
    """

    def __init__(self, *, processes: int = 0, device: torch.device | None = None) -> None:
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes, self.device = processes, device
        self._allocate: Allocator = empty_volume
        self._stream: torch.cuda.Stream | None = None
        if device is not None:
            import torch

            if device.type != "cuda":
                raise ValueError(f"volumes are staged on CUDA devices only, not {device}")
            self._allocate = _pinned
            self._stream = torch.cuda.Stream(device=device)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, paths: Sequence[Path]) -> LoadedSeries:
        """Load one series (:func:`qgate.score.volume.load_series`), staged on the device if any."""
        if self.processes:
            loaded = self._load_elsewhere([str(p) for p in paths])
        else:
            loaded = load_series(paths, allocate=self._allocate)
        if self._stream is not None:
            loaded.volume = self._stage(loaded.volume)
        return loaded

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def _load_elsewhere(self, paths: list[str]) -> LoadedSeries:
        pool = self._executor()
        try:
            name, shape, loaded = pool.submit(_decode_shared, paths).result()
        except BrokenProcessPool:
            # A decoder died (a native decoder crash, or killed): this series fails (its
            # attempt counts), the next one gets a fresh pool.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        shm = SharedMemory(name=name)
        try:
            hu = self._allocate(shape)
            hu[...] = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
        finally:
            _release(shm, unlink=True)
        loaded.volume = replace(loaded.volume, hu=hu)
        return loaded

    def _stage(self, volume: SeriesVolume) -> SeriesVolume:
        """Copy the volume to the device on this decoder's stream and wait for it here.

        The consumer calls :func:`adopt` before it uses the copy on its own stream.
        """
        import torch

        assert self._stream is not None and self.device is not None
        host = torch.from_numpy(volume.hu)
        with torch.cuda.stream(self._stream):
            on_device = host.to(self.device, non_blocking=True)
        self._stream.synchronize()  # blocks this decode thread only
        return replace(volume, device_hu=on_device)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def adopt(volume: SeriesVolume) -> None:
    """Before a volume staged by another thread's stream is used on this thread's stream:
    its device memory must not be reused until this stream's work on it is done."""
    staged = volume.device_hu
    if staged is not None and staged.device.type == "cuda":
        import torch

        staged.record_stream(torch.cuda.current_stream(staged.device))
