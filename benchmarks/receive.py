"""Receive throughput: storescu -> qgate serve vs storescu -> Orthanc, same series, same run.

Each repetition sends a fresh copy of the series (new UIDs, so neither side sees
duplicates) over ONE association with dcmtk storescu, and times storescu's wall clock.
One unmeasured warm-up send to each receiver comes first, after the generated series
are flushed to disk.
qgate runs as `qgate serve` with its database recorded (SQLite WAL, synchronous=NORMAL)
and fsync on (one flush per instance, see qgate/spool.py); Orthanc runs with its defaults
(SQLite index, storage area synced: one fdatasync per instance) plus TCP_NODELAY.
A third receiver bounds what any pynetdicom-based SCP can do here: pynetdicom with qgate's
acceptor loop (qgate.receive.reactor) and a C-STORE handler that returns Success at once,
storing nothing. Prints a table; paste it into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/receive.py --slices 200 --size 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from qgate.receive.reactor import start_server
from qgate.receive.scp import TRANSFER_SYNTAXES
from qgate.synth import make_ct_series, write_series
from tests.conftest import free_port
from tests.support.orthanc import start_orthanc
from tests.support.qgate_proc import QgateProcess


def _send(host_port: int, aec: str, files: list[Path]) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(host_port), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")
    return dt


def _start_floor(port: int) -> object:
    """pynetdicom, qgate's acceptor loop, a handler that stores nothing."""
    ae = AE("FLOOR")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, list(TRANSFER_SYNTAXES))

    def handler(event: evt.Event) -> int:
        event.encoded_dataset()  # the bytes qgate would write, then nothing
        return 0x0000

    return start_server(ae, ("127.0.0.1", port), [(evt.EVT_C_STORE, handler)])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-fsync", action="store_true", help="qgate without fsync (not the default)")
    ap.add_argument(
        "--all-scorers",
        action="store_true",
        help="qgate with its default scorers, the three models loaded (idle during the run)",
    )
    ap.add_argument(
        "--fsync-directory", action="store_true", help="qgate also fsyncs the folder (strict)"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="qgate-bench-") as tmp:
        work = Path(tmp)
        series = []
        for rep in range((args.reps + 1) * 3):  # one unmeasured warm-up rep
            ds = make_ct_series(args.slices, args.size, args.size, seed=rep)
            series.append(write_series(ds, work / f"in{rep}"))
        mb = sum(p.stat().st_size for p in series[0]) / 1e6
        # The generated series are gigabytes of dirty pages; left to the kernel, their
        # writeback would compete with the receivers' own writes in the first reps.
        os.sync()

        archive = start_orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port())
        cfg = {
            "dicom": {"ae_title": "QGATE", "host": "127.0.0.1", "port": free_port()},
            "archive": {"port": archive.dicom_port},
            # Long enough that scoring does not compete with receiving during the run.
            "series": {"stable_seconds": 3600, "release_grace_seconds": 3600},
            # Nothing is scored during the run; the classical scorers only spare the
            # start-up of loading the models (--all-scorers loads them, as serve does).
            **({} if args.all_scorers else {"scoring": {"scorers": ["noise", "snr"]}}),
            "database": {"url": f"sqlite:///{work / 'qgate.db'}"},
            "storage": {
                "root": str(work / "var"),
                "fsync": not args.no_fsync,
                "fsync_directory": args.fsync_directory,
            },
        }
        q = QgateProcess(work, cfg).start()
        floor_port = free_port()
        floor = _start_floor(floor_port)
        times: dict[str, list[float]] = {"qgate": [], "orthanc": [], "pynetdicom no-op": []}
        try:
            receivers = [
                ("qgate", q.port, "QGATE"),
                ("orthanc", archive.dicom_port, "ARCHIVE"),
                ("pynetdicom no-op", floor_port, "FLOOR"),
            ]
            for k, (_, port, aec) in enumerate(receivers):  # warm-up: first association
                _send(port, aec, series[3 * args.reps + k])
            for rep in range(args.reps):
                # Alternate the order so neither side always runs on a warmer page cache.
                order = receivers[rep % 3 :] + receivers[: rep % 3]
                for k, (name, port, aec) in enumerate(order):
                    times[name].append(_send(port, aec, series[3 * rep + k]))
            rows = q.cli_json("results", "--json")
            received = sum(r["instances"] for r in rows)
        finally:
            floor.shutdown()  # type: ignore[attr-defined]
            q.stop()
            archive.stop()
        expected = (args.reps + 1) * args.slices  # with the warm-up
    assert received == expected, f"qgate recorded {received} instances"

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        f"series: {args.slices} x {args.size}x{args.size} CT, {mb:.1f} MB, one association, "
        f"{args.reps} reps, fsync {'off' if args.no_fsync else 'on'}"
        f"{' + folder' if args.fsync_directory else ''}, load average {os.getloadavg()[0]:.1f}"
        f"{', qgate with all scorers loaded' if args.all_scorers else ''}"
    )
    print()
    print("| receiver | median s | min s | instances/s (median) | ms/instance | MB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(
            f"| {name} | {med[name]:.3f} | {min(ts):.3f} | {args.slices / med[name]:.1f} | "
            f"{1000 * med[name] / args.slices:.2f} | {mb / med[name]:.1f} |"
        )
    # Each rep sends to all three back to back, so a rep's own ratio is less exposed to
    # the host's speed drifting between reps than the ratio of the medians.
    paired = statistics.median(o / q for o, q in zip(times["orthanc"], times["qgate"], strict=True))
    print()
    print(f"ratio qgate/orthanc instances/s: {med['orthanc'] / med['qgate']:.2f}x")
    print(f"median of the per-rep ratios qgate/orthanc: {paired:.2f}x")
    floor_ratio = med["orthanc"] / med["pynetdicom no-op"]
    print(f"ratio pynetdicom no-op/orthanc instances/s: {floor_ratio:.2f}x")


if __name__ == "__main__":
    main()
