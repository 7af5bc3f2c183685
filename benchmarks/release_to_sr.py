"""Latency of one series: association release -> its SR (and quality maps) in the archive.

Issue 10's goal: a 300-slice series' SR in the archive <= 60 s after association release,
on 2 CPU cores. This times the whole service path with real peers: ``qgate serve`` (one
process tree: receive + assembler, worker, dispatch; embedded SQLite) in a temporary
folder, its archive a real Orthanc (tests/support/orthanc.py, TCP_NODELAY), the series
sent by DCMTK ``storescu`` (TCP_NODELAY=1) over one association.

qgate runs its default configuration (gate mode observe: only qgate's objects go to the
archive; all default scorers, the three learned models with the shipped weights, default
max_slices, batch size, prefetch and poll intervals; fsync on) except:

* ``series.release_grace_seconds: 0``: a series is complete as soon as the association
  that sent it is released (``series.stable_seconds`` keeps its default: a series must
  not complete while it is still arriving); the assembler still polls every
  ``series.poll_seconds`` (default 1 s), which stays in the measured time;
* ``scoring.torch_threads`` from ``--threads`` (unset: the default, one per core);
* web, retraining and retention off (nothing scheduled fires during a run).

qgate serve starts once and is timed only after every stage logs that it runs: model
loading is not in the times. One unmeasured warm-up series (``--warmup-slices``, same
size) then runs first inference; every repetition sends a new study (new UIDs) after the
previous one is in the archive. The clock starts when storescu exits (the association
is released) and stops at the first poll (every ``--poll`` s, Orthanc's REST
``/tools/find``) that finds the SR of that study, then the first that finds every
quality-map instance (the SC series and the parametric map, the count taken from
qgate's outbox row). The split per stage comes from qgate's own records (series
``released_at``, the events trail: queued, claimed, started, scored, dispatch claimed,
sent; the result's scoring seconds), on the same host clock. Beside each repetition:
the CPU seconds (user + system) of qgate's process tree and of every other process on
the host from the send to the results send recorded done: on a shared host, the second
says how much of the two cores the run did not have.

    flock /tmp/qgate-bench.lock .venv/bin/python -u benchmarks/release_to_sr.py \\
        --slices 300 --reps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, create_engine, select

from benchmarks.receive import _TICK, _cpu_seconds
from qgate.core.db.models import Event, OutboxItem, Result, Series
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.qgate_proc import QgateProcess

REPO = Path(__file__).resolve().parents[1]
STAGES = ("worker", "dispatch", "receive")

#: The stage split: (label, from mark, to mark); marks are seconds after release.
SPLIT = (
    ("assembly: release seen, grace, assembler poll", "release", "queued"),
    ("worker claims the job", "queued", "claimed"),
    ("decode the instances", "claimed", "started"),
    ("scorers (result seconds less decode)", "started", "scorers done"),
    ("report objects written, result committed", "scorers done", "scored"),
    ("dispatcher claims the send", "scored", "dispatch claimed"),
    ("C-STORE of SR + maps to Orthanc", "dispatch claimed", "sent"),
    ("benchmark's poll sees the maps", "sent", "maps in archive"),
)


@dataclass
class Rep:
    send_s: float
    sr_s: float
    maps_s: float
    marks: dict[str, float] = field(default_factory=dict)
    result: str = ""
    load: float = 0.0
    #: CPU seconds from the send to the end of the dispatch: qgate's process tree, and
    #: every other process on the host (Orthanc, this script, other people's jobs).
    qgate_cpu: float = 0.0
    other_cpu: float = 0.0


def _copy(base: list[Dataset], folder: Path) -> tuple[str, str, list[Path]]:
    """``base`` as a new study and series (new UIDs) in ``folder``."""
    study, series = generate_uid(), generate_uid()
    for ds in base:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return study, series, write_series(base, folder)


def _config(work: Path, archive: Orthanc, args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": free_port()},
        "archive": {"ae_title": archive.aet, "host": "127.0.0.1", "port": archive.dicom_port},
        "series": {"release_grace_seconds": 0.0},
        "database": {"url": f"sqlite:///{work / 'qgate.db'}"},
        "storage": {"root": str(work / "var")},
        "web": {"enabled": False},
        "retrain": {"enabled": False},
        "retention": {"enabled": False},
    }
    if args.threads:
        cfg["scoring"] = {"torch_threads": args.threads}
    return cfg


def _git() -> str:
    def out(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    head = out("log", "-1", "--oneline").strip()
    dirty = [line[3:] for line in out("status", "--porcelain", "--", "qgate").splitlines()]
    return f"{head}; qgate/ " + (f"not committed: {', '.join(dirty)}" if dirty else "clean")


def _host_busy() -> float:
    """CPU seconds the host has been busy (every core, /proc/stat less idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


def _wait_sent(engine: Engine, series_uid: str, timeout: float = 60.0) -> None:
    """Until qgate recorded the results send as done (it commits after the association)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as c:
            state = c.scalar(
                select(OutboxItem.state).where(
                    OutboxItem.series_instance_uid == series_uid, OutboxItem.kind == "results"
                )
            )
        if state == "sent":
            return
        time.sleep(0.1)
    raise TimeoutError(f"series {series_uid}: results send not recorded as sent")


def _send(q: QgateProcess, files: list[Path]) -> tuple[float, float]:
    """storescu over one association: its seconds and the wall-clock time it exited."""
    t0 = time.perf_counter()
    r = q.storescu(files)
    released = time.time()
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0, released


def _expected_objects(engine: Engine, series_uid: str) -> int | None:
    """Files in the series' results send (SR + maps), once qgate queued it."""
    with engine.connect() as c:
        paths = c.scalar(
            select(OutboxItem.paths).where(
                OutboxItem.series_instance_uid == series_uid, OutboxItem.kind == "results"
            )
        )
    return None if paths is None else len(paths)


def _wait_archive(
    archive: Orthanc, engine: Engine, study: str, series: str, poll: float, timeout: float
) -> tuple[float, float]:
    """Wall-clock times of the first polls that saw the SR, then every report object."""
    t_sr: float | None = None
    expected: int | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.time()
        found = archive.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study}, "Expand": True},
        )
        sr = any(s["MainDicomTags"].get("Modality") == "SR" and s["Instances"] for s in found)
        if sr and t_sr is None:
            t_sr = now
        if t_sr is not None:
            expected = expected or _expected_objects(engine, series)
            if expected is not None and sum(len(s["Instances"]) for s in found) >= expected:
                return t_sr, now
        time.sleep(poll)
    raise TimeoutError(f"series {series}: SR {'seen' if t_sr else 'not seen'}, maps not all in")


def _marks(engine: Engine, series_uid: str, released: float) -> tuple[dict[str, float], str]:
    """qgate's records of the series as seconds after ``released`` (first of each)."""
    t0 = dt.datetime.fromtimestamp(released, dt.UTC)
    wanted = {
        ("queue", "queued"): "queued",
        ("queue", "claimed"): "claimed",
        ("score", "started"): "started",
        ("score", "scored"): "scored",
        ("dispatch", "claimed"): "dispatch claimed",
        ("dispatch", "sent"): "sent",
    }
    marks: dict[str, float] = {}
    with engine.connect() as c:
        row = c.execute(
            select(Series.released_at, Series.first_received_at, Series.last_received_at).where(
                Series.series_instance_uid == series_uid
            )
        ).one()
        events = c.execute(
            select(Event.at, Event.stage, Event.event)
            .where(Event.series_instance_uid == series_uid)
            .order_by(Event.id)
        ).all()
        res = c.execute(
            select(
                Result.seconds, Result.slices_scored, Result.decision, Result.skipped_parts
            ).where(Result.series_instance_uid == series_uid)
        ).one()
    marks["qgate saw release"] = (row.released_at - t0).total_seconds()
    marks["receive (first to last instance)"] = (
        row.last_received_at - row.first_received_at
    ).total_seconds()
    for at, stage, event in events:
        name = wanted.get((stage, event))
        if name is not None and name not in marks:
            marks[name] = (at - t0).total_seconds()
    if {"claimed", "started"} <= marks.keys():
        decode = marks["started"] - marks["claimed"]
        marks["scorers done"] = marks["started"] + res.seconds - decode
    skipped = f", skipped {len(res.skipped_parts)} part(s)" if res.skipped_parts else ""
    info = f"{res.decision}, {res.slices_scored} slices scored, {res.seconds:.1f} s{skipped}"
    return marks, info


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512, help="rows = columns")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="scoring.torch_threads (unset: the default)")
    ap.add_argument("--warmup-slices", type=int, default=16, help="0: no warm-up series")
    ap.add_argument("--poll", type=float, default=0.2, help="archive poll interval, s")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per series")
    args = ap.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()
    commit = _git()
    reps: list[Rep] = []

    with tempfile.TemporaryDirectory(prefix="qgate-bench-release-") as tmp:
        work = Path(tmp)
        base = make_ct_series(args.slices, args.size, args.size, seed=0)
        sends = [_copy(base, work / f"in{k}") for k in range(args.reps)]
        warmup = _copy(base[: args.warmup_slices], work / "warmup") if args.warmup_slices else None
        mb = sum(p.stat().st_size for p in sends[0][2]) / 1e6
        del base
        os.sync()  # the generated files' writeback must not compete with the runs

        archive = start_orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port())
        cfg = _config(work, archive, args)
        q = QgateProcess(work / "qgate", cfg)
        engine = create_engine(cfg["database"]["url"])
        try:
            t_load = time.perf_counter()
            q.start(timeout=300)
            q.wait_for(
                lambda: all(f"stage {s} running" in q.log() for s in STAGES),
                timeout=300,
                what="every stage running (models loaded)",
            )
            print(f"qgate serve up, models loaded: {time.perf_counter() - t_load:.1f} s")
            if warmup is not None:
                study, series, files = warmup
                _, released = _send(q, files)
                t_sr, _ = _wait_archive(archive, engine, study, series, args.poll, args.timeout)
                print(f"warm-up ({len(files)} slices, not timed): SR after {t_sr - released:.1f} s")
            qpid = q.proc.pid  # type: ignore[union-attr]
            for k, (study, series, files) in enumerate(sends):
                cpu0, host0 = _cpu_seconds(qpid), _host_busy()
                send_s, released = _send(q, files)
                t_sr, t_maps = _wait_archive(
                    archive, engine, study, series, args.poll, args.timeout
                )
                _wait_sent(engine, series)
                qgate_cpu, host_cpu = _cpu_seconds(qpid) - cpu0, _host_busy() - host0
                marks, info = _marks(engine, series, released)
                marks["SR in archive"] = t_sr - released
                marks["maps in archive"] = t_maps - released
                marks["release"] = 0.0
                rep = Rep(send_s, t_sr - released, t_maps - released, marks, info)
                rep.load = os.getloadavg()[0]
                rep.qgate_cpu, rep.other_cpu = qgate_cpu, host_cpu - qgate_cpu
                reps.append(rep)
                print(
                    f"rep {k + 1}: send {send_s:.1f} s, SR {rep.sr_s:.1f} s, maps "
                    f"{rep.maps_s:.1f} s after release ({info}; qgate CPU {qgate_cpu:.0f} s, "
                    f"others {rep.other_cpu:.0f} s; load {rep.load:.2f})",
                    flush=True,
                )
        finally:
            engine.dispose()
            q.stop()
            archive.stop(kill=True)
    _report(args, reps, mb, commit, load_start, os.getloadavg(), time.perf_counter() - started)


def _median(reps: list[Rep], key: str) -> str:
    vals = [r.marks[key] for r in reps if key in r.marks]
    return f"{statistics.median(vals):.2f}" if vals else "n/a"


def _report(
    args: argparse.Namespace,
    reps: list[Rep],
    mb: float,
    commit: str,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
    total_s: float,
) -> None:
    cores = len(os.sched_getaffinity(0))
    print()
    print(f"# qgate release -> SR in the archive ({total_s:.0f} s)")
    print(
        f"host: {platform.node()} {platform.machine()}, {cores} cores, python "
        f"{platform.python_version()}; load average (1 min) {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end"
    )
    print(f"commit: {commit}")
    print(
        f"series: {args.slices} x {args.size}x{args.size} CT ({mb:.0f} MB), one storescu "
        f"association; qgate serve defaults (SQLite, all default scorers, shipped weights) "
        f"with series.release_grace_seconds 0, torch_threads "
        f"{args.threads or 'default'}; model loading not timed, warm-up series of "
        f"{args.warmup_slices} slices; archive polled every {args.poll} s; median of "
        f"{len(reps)} reps"
    )
    print()
    print(
        "| rep | storescu s | release -> SR in archive s | release -> maps in archive s "
        "| qgate result | qgate CPU s | other processes' CPU s | load (1 min) |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for k, r in enumerate(reps, 1):
        print(
            f"| {k} | {r.send_s:.1f} | {r.sr_s:.1f} | {r.maps_s:.1f} | {r.result} "
            f"| {r.qgate_cpu:.0f} | {r.other_cpu:.0f} | {r.load:.2f} |"
        )
    print(
        f"| **median** | {statistics.median(r.send_s for r in reps):.1f} | "
        f"**{statistics.median(r.sr_s for r in reps):.1f}** | "
        f"**{statistics.median(r.maps_s for r in reps):.1f}** | | "
        f"{statistics.median(r.qgate_cpu for r in reps):.0f} | "
        f"{statistics.median(r.other_cpu for r in reps):.0f} | |"
    )
    print()
    print(
        "CPU s: user + system from the send to the results send recorded done; qgate's "
        "process tree, and the rest of the host (Orthanc, this script, other jobs)."
    )
    print()
    print("| stage (qgate's records) | median s | median s after release at its end |")
    print("| --- | ---: | ---: |")
    r0 = "receive (first to last instance)"
    print(f"| {r0}, before release | {_median(reps, r0)} | |")
    print(f"| qgate saw the release | | {_median(reps, 'qgate saw release')} |")
    for label, a, b in SPLIT:
        vals = [r.marks[b] - r.marks[a] for r in reps if a in r.marks and b in r.marks]
        med = f"{statistics.median(vals):.2f}" if vals else "n/a"
        print(f"| {label} | {med} | {_median(reps, b)} |")


if __name__ == "__main__":
    main()
