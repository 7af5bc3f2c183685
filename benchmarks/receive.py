"""Receive throughput: storescu -> qgate vs storescu -> Orthanc, same series, same run.

Two scenarios, each repetition with fresh UIDs (neither side sees duplicates):

* one association sending ``--slices`` instances (dcmtk storescu);
* ``--parallel`` simultaneous associations (one storescu each), each sending its own
  series of ``--slices / --parallel`` instances.

The time is storescu's wall clock (for the parallel scenario, from the first start to the
last exit); instances/s = instances sent / time. The receiver's CPU time
(user + system, its child processes included) per instance is reported beside it: less
exposed than the wall clock to other jobs on the host; so is the senders' (storescu) CPU
per instance, and the ceiling they imply: cores x 1000 / (receiver + sender ms), the most
instances/s this host could carry with both on it. One unmeasured warm-up send of each
scenario goes to each receiver first, after the generated series are flushed to disk.
Within a repetition the receivers take turns, the order rotating, so the host's speed
drifting affects all of them alike.

qgate runs as ``qgate receive`` (``--receivers`` processes on one port, its database
recorded: SQLite WAL, synchronous=NORMAL) with fsync on (one flush per instance, see
qgate/core/spool.py); Orthanc (Debian) runs with its defaults (SQLite index, one fdatasync per
instance, TcpNoDelay). storescu runs with TCP_NODELAY=1.

``--without NAME`` (repeatable) adds a qgate variant with that pynetdicom internal turned
off (``dicom.internals``; ``none`` turns every one off); ``--ablation`` adds one variant
per internal and ``none``. Prints tables; paste them into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/receive.py --slices 300 --parallel 4 --size 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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

from qgate.core.config import RECEIVE_INTERNALS
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.qgate_proc import QgateProcess


@dataclass
class Receiver:
    name: str
    port: int
    aec: str
    pid: int
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    sender_cpu: dict[str, list[float]] = field(default_factory=dict)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants (qgate's listener processes)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _cpu_seconds(int(child))
    except FileNotFoundError:  # exited meanwhile
        pass
    return total


def _storescu(port: int, aec: str, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _send(rx: Receiver, batches: list[list[Path]]) -> tuple[float, float, float]:
    """Send each batch on its own association, all at once: seconds until the last ends,
    the receiver's CPU seconds meanwhile, and the senders' (storescu, waited for here)."""
    cpu0, snd0, t0 = _cpu_seconds(rx.pid), _children_cpu(), time.perf_counter()
    procs = [_storescu(rx.port, rx.aec, files) for files in batches]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {rx.name} failed: {err[-2000:]}")
    return time.perf_counter() - t0, _cpu_seconds(rx.pid) - cpu0, _children_cpu() - snd0


def _copy(base: list[Dataset], folder: Path) -> list[Path]:
    """``base`` as a new series (new study, series and instance UIDs) in ``folder``."""
    study, series = generate_uid(), generate_uid()
    for ds in base:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return write_series(base, folder)


def _qgate_config(
    work: Path, name: str, args: argparse.Namespace, receivers: int, internals: list[str]
) -> Any:
    return {
        "dicom": {
            "ae_title": "QGATE",
            "host": "127.0.0.1",
            "port": free_port(),
            "receivers": receivers,
            "internals": internals,
        },
        # Long enough that assembly does not compete with receiving during the run.
        "series": {"stable_seconds": 3600, "release_grace_seconds": 3600},
        "database": {"url": f"sqlite:///{work / name / 'qgate.db'}"},
        "storage": {"root": str(work / name / "var"), "fsync": not args.no_fsync},
    }


def _variants(args: argparse.Namespace) -> dict[str, tuple[int, list[str]]]:
    """qgate variant name -> its receiver processes and the internals it keeps."""
    every = list(RECEIVE_INTERNALS)
    first, *more = args.receivers
    off = [*RECEIVE_INTERNALS, "none"] if args.ablation else list(args.without)
    out = {"qgate": (first, every)}
    for n in more:
        out[f"qgate x{n}"] = (n, every)
    for name in off:
        # "a+b" turns several off in one variant
        drop = set(every) if name == "none" else set(name.split("+"))
        unknown = drop - set(every)
        if unknown:
            raise SystemExit(f"unknown internal(s) {sorted(unknown)}; known: {every}")
        out[f"qgate -{name}"] = (first, [i for i in every if i not in drop])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=4, help="simultaneous associations")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--receivers",
        type=int,
        nargs="+",
        default=[2],
        help="qgate dicom.receivers; more values add variants (the first is the reference)",
    )
    ap.add_argument("--no-fsync", action="store_true", help="qgate without fsync (not the default)")
    ap.add_argument(
        "--without",
        action="append",
        default=[],
        help="add a qgate variant without this pynetdicom internal (repeatable; a+b: both off)",
    )
    ap.add_argument("--ablation", action="store_true", help="a variant without each internal")
    args = ap.parse_args()
    per = args.slices // args.parallel
    scenarios = {"one": f"1 x {args.slices}", "parallel": f"{args.parallel} x {per}"}
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="qgate-bench-") as tmp:
        work = Path(tmp)
        # Pixel data generated once; every send is a copy with fresh UIDs.
        base = make_ct_series(args.slices, args.size, args.size, seed=0)
        chunks = [base[k * per : (k + 1) * per] for k in range(args.parallel)]
        sends: list[dict[str, list[list[Path]]]] = []  # rep -> scenario -> batches
        for rep in range(args.reps + 1):  # rep 0: the unmeasured warm-up
            one = [_copy(base, work / f"in{rep}-one")]
            par = [_copy(chunk, work / f"in{rep}-par{k}") for k, chunk in enumerate(chunks)]
            sends.append({"one": one, "parallel": par})
        mb = sum(p.stat().st_size for p in sends[0]["one"][0]) / 1e6
        # The generated series are gigabytes of dirty pages; left to the kernel, their
        # writeback would compete with the receivers' own writes in the first reps.
        os.sync()

        archive: Orthanc = start_orthanc(
            work / "orthanc", dicom_port=free_port(), http_port=free_port()
        )
        qgates: dict[str, QgateProcess] = {}
        try:
            for name, (n, internals) in _variants(args).items():
                cfg = _qgate_config(work, name.replace(" ", ""), args, n, internals)
                q = QgateProcess(work / name.replace(" ", ""), cfg, command=["receive"])
                q.cli("db", "upgrade")
                qgates[name] = q.start()
            # Every listener process up before the clock starts.
            deadline = time.monotonic() + 60
            variants = _variants(args)
            while time.monotonic() < deadline and any(
                q.log().count("stage receive running") < variants[name][0]
                for name, q in qgates.items()
            ):
                time.sleep(0.2)
            receivers = [
                Receiver(n, q.port, "QGATE", q.proc.pid)  # type: ignore[union-attr]
                for n, q in qgates.items()
            ]
            orthanc_pid = archive._proc.pid  # type: ignore[union-attr]
            receivers.append(Receiver("orthanc", archive.dicom_port, "ARCHIVE", orthanc_pid))
            for rx in receivers:
                rx.times = {s: [] for s in scenarios}
                rx.cpu = {s: [] for s in scenarios}
                rx.sender_cpu = {s: [] for s in scenarios}
            for rep, batches in enumerate(sends):
                for s in scenarios:
                    k = rep % len(receivers)
                    for rx in receivers[k:] + receivers[:k]:
                        dt, cpu, sender = _send(rx, batches[s])
                        if rep:  # rep 0 warms up
                            rx.times[s].append(dt)
                            rx.cpu[s].append(cpu)
                            rx.sender_cpu[s].append(sender)
            expected = (args.reps + 1) * (args.slices + per * args.parallel)
            for name, q in qgates.items():
                got = sum(r["instances"] for r in q.cli_json("results", "--json"))
                assert got == expected, f"{name} recorded {got} of {expected} instances"
        finally:
            for q in qgates.values():
                q.stop()
            archive.stop()
    load_end = os.getloadavg()
    _report(args, scenarios, receivers, mb, load_start, load_end)


def _report(
    args: argparse.Namespace,
    scenarios: dict[str, str],
    receivers: list[Receiver],
    mb: float,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
) -> None:
    n = {"one": args.slices, "parallel": (args.slices // args.parallel) * args.parallel}
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        f"series: {args.size}x{args.size} CT, {mb / args.slices:.2f} MB per instance, "
        f"{args.reps} reps, qgate receivers {args.receivers[0]}, fsync "
        f"{'off' if args.no_fsync else 'on'}; load average (1 min) {load_start[0]:.2f} at "
        f"start, {load_end[0]:.2f} at end"
    )
    print()
    orthanc = receivers[-1]
    print(
        "| receiver | associations | median s | min s | instances/s | qgate/Orthanc "
        "| receiver CPU ms/instance | storescu CPU ms/instance | CPU-bound ceiling/s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s, label in scenarios.items():
        ref = statistics.median(orthanc.times[s])
        for rx in receivers:
            med = statistics.median(rx.times[s])
            ratio = f"{ref / med:.2f}x" if rx is not orthanc else ""
            cpu = 1000 * statistics.median(rx.cpu[s]) / n[s]
            sender = 1000 * statistics.median(rx.sender_cpu[s]) / n[s]
            # the most instances/s the host's cores could carry at these CPU costs
            ceiling = 1000 * (os.cpu_count() or 1) / (cpu + sender)
            print(
                f"| {rx.name} | {label} | {med:.3f} | {min(rx.times[s]):.3f} | "
                f"{n[s] / med:.1f} | {ratio} | {cpu:.2f} | {sender:.2f} | {ceiling:.0f} |"
            )
    print()
    for s, label in scenarios.items():
        q = receivers[0]
        # Each rep sends to every receiver back to back: its own ratio is less exposed to
        # the host's drift than the ratio of the medians.
        paired = statistics.median(o / t for o, t in zip(orthanc.times[s], q.times[s], strict=True))
        ratio = statistics.median(orthanc.times[s]) / statistics.median(q.times[s])
        print(f"{label}: qgate/Orthanc {ratio:.2f}x (median of per-rep ratios {paired:.2f}x)")
    # Each rep, every receiver's time, and each variant against the first qgate back to back
    # (below 1.00x: the variant is slower), so a difference can be read against the spread.
    print()
    for s, label in scenarios.items():
        q = receivers[0]
        for rx in receivers:
            times = " ".join(f"{t:.3f}" for t in rx.times[s])
            line = f"{label} {rx.name}: {times}"
            if rx is not q and rx is not receivers[-1]:
                per = [t / v for t, v in zip(q.times[s], rx.times[s], strict=True)]
                line += (
                    f"  | vs {q.name} per rep: median {statistics.median(per):.2f}x, "
                    f"{min(per):.2f}-{max(per):.2f}x"
                )
            print(line)


if __name__ == "__main__":
    main()
