"""Scale-out of scoring: series per minute of one ``qgate worker`` process against two.

Each run starts ``--workers`` worker processes (``qgate worker --slot i``, one torch
thread each: ``scoring.torch_threads: 1`` and ``OMP_NUM_THREADS=1``) on one database,
lets them warm up on two series per process, then queues ``--series`` synthetic CT
series at once (spooled beforehand, with their instance rows, as the receiver leaves
them) and times from that commit until the last job is done (the database polled every
0.1 s). series/min = series / time. The runs alternate between the worker counts, the
order rotating, so the host's speed drifting affects both alike; the summary takes the
median of ``--reps`` runs each and their ratio.

The workers run the default scorers (noise, snr and the three learned models, shipped
weights, default max_slices and batch size) and write every report object, as in
service. The database is SQLite (WAL) by default; ``--db postgresql`` starts a throwaway
PostgreSQL server (tests/support/postgres.py) for the run.

    nice -n 19 .venv/bin/python benchmarks/scaleout.py --series 12 --slices 8 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qgate.assemble.completion import queue_complete_series
from qgate.core.config import load_settings
from qgate.core.db import Job, make_engine, make_session_factory, upgrade
from qgate.core.db.models import utcnow
from tests.conftest import free_port
from tests.support.postgres import create_database, postgres_server
from tests.support.qgate_proc import QgateProcess
from tests.support.web import spool_series

DEFAULT_SCORERS = ("noise", "snr", "mdiqa", "n2q", "chestiqa")
_LATER = dt.timedelta(days=1)  # "now" for queue_complete_series: every spooled series


@dataclass
class Run:
    workers: int
    series: int
    seconds: float
    load_before: float
    load_after: float

    @property
    def per_minute(self) -> float:
        return 60.0 * self.series / self.seconds


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'qgate.db'}"
        return
    with postgres_server(free_port()) as base:
        yield create_database(base)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, db_url: str) -> None:
        self.args, self.work, self.db_url = args, work, db_url
        self.root = work / "var"
        self.config: dict[str, Any] = {
            "dicom": {"port": free_port(), "host": "127.0.0.1"},
            "database": {"url": db_url},
            "storage": {"root": str(self.root), "fsync": False, "min_free_mb": 0},
            "queue": {"poll_seconds": 0.2},
            "scoring": {"scorers": list(args.scorers.split(",")), "torch_threads": 1},
            "retrain": {"enabled": False},
            "retention": {"enabled": False},
            "node_name": "bench",
        }
        upgrade(db_url)
        self.settings = load_settings(
            path=None, **{k: self.config[k] for k in ("database", "storage")}
        )
        self.engine = make_engine(db_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine, node="bench")
        self.seed = 0

    def _spool(self, count: int) -> None:
        for _ in range(count):
            self.seed += 1
            spool_series(
                self.settings,
                self.sessions,
                n=self.args.slices,
                size=self.args.size,
                seed=1000 + self.seed,
                patient_id=f"B{self.seed}",
            )

    def _queue_and_wait(self, count: int, timeout: float) -> float:
        """Queue every spooled series at once; seconds until no job is left undone."""
        t0 = time.perf_counter()
        queued = queue_complete_series(self.sessions, self.settings.series, now=utcnow() + _LATER)
        assert len(queued) == count, (len(queued), count)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            with self.sessions() as s:
                left = s.scalar(
                    select(func.count(Job.id)).where(Job.state.in_(("queued", "running")))
                )
            if not left:
                seconds = time.perf_counter() - t0
                with self.sessions() as s:
                    bad = s.scalar(select(func.count(Job.id)).where(Job.state != "done"))
                if bad:
                    raise RuntimeError(f"{bad} job(s) not done (parked?)")
                return seconds
            time.sleep(0.1)
        raise TimeoutError(f"{count} series not scored in {timeout} s")

    def run(self, workers: int) -> Run:
        procs = [
            QgateProcess(
                self.work / f"w{workers}-{i}", self.config, command=["worker", "--slot", str(i)]
            )
            for i in range(workers)
        ]
        try:
            for p in procs:
                p.start(timeout=180)
            self._spool(2 * workers)
            self._queue_and_wait(2 * workers, self.args.timeout)  # warm-up, not timed
            self._spool(self.args.series)
            load_before = os.getloadavg()[0]
            seconds = self._queue_and_wait(self.args.series, self.args.timeout)
            load_after = os.getloadavg()[0]
        finally:
            for p in procs:
                p.stop()
        return Run(workers, self.args.series, seconds, load_before, load_after)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--series", type=int, default=12, help="series timed per run")
    ap.add_argument("--slices", type=int, default=8, help="slices per series")
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--reps", type=int, default=3, help="runs per worker count")
    ap.add_argument("--workers", default="1,2", help="worker process counts to compare")
    ap.add_argument("--scorers", default=",".join(DEFAULT_SCORERS))
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per queue drain")
    args = ap.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    # One torch (and BLAS) thread per worker process.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"

    runs: list[Run] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qgate-bench-scaleout-") as tmp:
        work = Path(tmp)
        with _database(args.db, work) as db_url:
            bench = Bench(args, work, db_url)
            try:
                for rep in range(args.reps):
                    order = counts[rep % len(counts) :] + counts[: rep % len(counts)]
                    for k in order:
                        run = bench.run(k)
                        runs.append(run)
                        print(
                            f"run {rep + 1}, {k} worker(s): {run.seconds:.1f} s, "
                            f"{run.per_minute:.2f} series/min, load {run.load_before:.2f}"
                            f" -> {run.load_after:.2f}",
                            flush=True,
                        )
            finally:
                bench.engine.dispose()

    print()
    print(f"# qgate scale-out benchmark ({time.perf_counter() - started:.0f} s)")
    print(
        f"host: {os.cpu_count()} CPUs ({_cpu_name()}), database {args.db}; "
        f"{args.series} series of {args.slices} x {args.size} x {args.size} per run, "
        f"scorers {args.scorers}, one torch thread per worker process; median of "
        f"{args.reps} runs"
    )
    print()
    print("| worker processes | runs (s) | median s | series/min | load average (1 min) |")
    print("| ---: | --- | ---: | ---: | --- |")
    medians: dict[int, float] = {}
    for k in counts:
        mine = [r for r in runs if r.workers == k]
        med = statistics.median(r.seconds for r in mine)
        medians[k] = 60.0 * args.series / med
        loads = ", ".join(f"{r.load_before:.2f}-{r.load_after:.2f}" for r in mine)
        print(
            f"| {k} | {', '.join(f'{r.seconds:.1f}' for r in mine)} | {med:.1f} | "
            f"{medians[k]:.2f} | {loads} |"
        )
    if len(counts) >= 2:
        base, top = counts[0], counts[-1]
        print()
        print(
            f"ratio {top} / {base} worker processes: **{medians[top] / medians[base]:.2f}x** "
            "series per minute"
        )


if __name__ == "__main__":
    main()
