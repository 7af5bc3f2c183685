"""Scoring throughput of the learned scorers, from decode to results.

Writes one synthetic CT series (qgate.synth, Part 10 files), builds each scorer set once
through the pipeline (``build_scorers``, as the worker does) and times
``qgate.score.pipeline.score_series`` on the files: read and decode every instance, HU volume,
the scorers (preprocessing, model, post-processing) and the gate decision. The report
objects (SR, SC, PM) are not included. One warm-up run, then the median of ``--reps``
runs; CPU time is the process's user + system time over the same runs (all threads), so
CPU / wall > 1 means several cores were busy.

The second table streams ``--stream`` series (the same files again; the scorer sets in
``--stream-sets``, default the three models together) through the worker's
pipeline (qgate.score.prefetch, as ``qgate worker`` runs it): series k + 1 is decoded,
and on CUDA copied to the device from page-locked memory, while series k is scored;
slices/s = slices of all the series / wall time from the first decode to the last
result, after one unmeasured series. ``--prefetch`` and ``--decode-processes`` default
to what the worker resolves for the device (``queue.prefetch``, ``queue.decode_processes``).

The shipped weights (qgate/weights/) are used when present; otherwise (or with
``--random``) random-init weights of the chosen variants are written to a temporary folder
and the output says so (the speed is that of the variant; the scores are meaningless).
``--weights-dir DIR`` scores with ``DIR/<model>.safetensors`` instead, where present: run
with and without it for a same-run reference of two weight sets.

    .venv/bin/python benchmarks/score.py --slices 200 --threads 2
    .venv/bin/python benchmarks/score.py --device cuda --slices 512 --max-slices all
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qgate.core.config import Settings, load_settings
from qgate.score.pipeline import LEARNED_SCORERS, build_scorers, score_loaded, score_series
from qgate.score.prefetch import PipelineShape, Prefetcher, SeriesDecoder, adopt, pipeline_shape
from qgate.score.scorers import Scorer
from qgate.score.scorers.learned import (
    CPU_BATCH_SIZE,
    CUDA_BATCH_SIZE,
    default_weights_path,
    resolve_device,
)
from qgate.score.volume import LoadedSeries, load_series
from qgate.synth import make_ct_series, write_series

_DEFAULT_VARIANTS = {"cpu": "tiny", "cuda": "small"}


def _random_weights(folder: Path, variants: dict[str, str]) -> dict[str, Path]:
    """Random-init weights of each variant, saved the way the scorers load them."""
    from safetensors.torch import save_file

    from qgate.models import create_model, save_mdiqa

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for family, variant in variants.items():
        path = folder / f"{family}.safetensors"
        model = create_model(variant)
        if family == "mdiqa":
            save_mdiqa(model, path)  # type: ignore[arg-type]
        else:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(path), metadata={"qgate_model": variant})
        out[family] = path
    return out


def _settings(
    scorers: list[str],
    args: argparse.Namespace,
    weights: dict[str, Path | None],
    variants: dict[str, str | None],
) -> Settings:
    per_model: dict[str, dict[str, object]] = {}
    for family in LEARNED_SCORERS:
        cfg: dict[str, object] = {
            "weights": weights[family],
            "variant": variants[family],
            "amp": not args.fp32,
        }
        if family != "chestiqa":
            cfg |= {"batch_size": args.batch_size}
            if args.max_slices is not None:  # else each model's default (scoring.<model>)
                cfg["max_slices"] = None if args.max_slices == "all" else int(args.max_slices)
        per_model[family] = cfg
    return load_settings(
        path=None,
        queue={"prefetch": args.prefetch, "decode_processes": args.decode_processes},
        scoring={
            "scorers": scorers,
            "device": args.device,
            "torch_threads": args.threads,
            **per_model,
        },
    )


def _time(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median wall s, median CPU s) over ``reps`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _stream(paths: list[Path], scorers: list[Scorer], shape: PipelineShape, count: int) -> float:
    """Wall seconds to decode and score ``count`` series through the worker's pipeline."""
    decoder = SeriesDecoder(processes=shape.decode_processes, device=shape.device)

    def prepare(series: list[Path]) -> LoadedSeries | Exception:
        try:
            return decoder(series)
        except Exception as exc:  # handed to the consumer, which raises it
            return exc

    def run(n: int) -> float:
        todo = iter([paths] * n)
        ahead = Prefetcher(
            lambda: next(todo, None),
            prepare,
            depth=max(1, shape.prefetch),
            poll_seconds=0.01,
            name="bench",
        )
        t0 = time.perf_counter()
        ahead.start()
        try:
            for _ in range(n):
                loaded = None
                while loaded is None:
                    loaded = ahead.get(timeout=1.0)
                if isinstance(loaded, Exception):
                    raise loaded
                adopt(loaded.volume)
                score_loaded(loaded, scorers, [])
                del loaded
            if shape.device is not None:
                torch.cuda.synchronize(shape.device)
            return time.perf_counter() - t0
        finally:
            ahead.close()

    try:
        run(1)  # warm-up: decoder processes, CUDA kernels, page-locked blocks
        return run(count)
    finally:
        decoder.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices per forward pass (default: the scorers' own, 16 on CPU and 64 on CUDA)",
    )
    ap.add_argument("--fp32", action="store_true", help="amp off: fp32 on CPU and CUDA")
    ap.add_argument(
        "--random", action="store_true", help="random-init weights even if shipped ones exist"
    )
    ap.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="score with DIR/<model>.safetensors where present instead of the shipped file "
        "(run once with and once without it for a same-run reference of two weight sets)",
    )
    ap.add_argument(
        "--max-slices",
        default=None,
        help="slices the per-slice models score, or 'all' (default: each model's default)",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated entry points for random-init weights, e.g. mdiqa_tiny,"
        "n2q_tiny,chestiqa_tiny (default: tiny on CPU, small on CUDA)",
    )
    ap.add_argument(
        "--stream", type=int, default=4, help="series streamed through the pipeline (0: off)"
    )
    ap.add_argument(
        "--stream-sets", default="all", help="the scorer sets streamed (names as in --sets)"
    )
    ap.add_argument("--prefetch", type=int, default=None, help="series decoded ahead")
    ap.add_argument("--decode-processes", type=int, default=None, help="decoder processes")
    ap.add_argument(
        "--sets",
        default="mdiqa,n2q,chestiqa,all",
        help="scorer sets to time: names, 'all' = the three learned scorers",
    )
    args = ap.parse_args()
    if args.max_slices not in (None, "all") and int(args.max_slices) < 2:
        ap.error("--max-slices must be >= 2 or 'all'")

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size_name = _DEFAULT_VARIANTS[device.type]
    chosen = {f: f"{f}_{size_name}" for f in LEARNED_SCORERS}
    if args.variants:
        for v in args.variants.split(","):
            family = v.split("_", 1)[0]
            if family not in chosen:
                ap.error(f"unknown variant {v!r}")
            chosen[family] = v

    with tempfile.TemporaryDirectory(prefix="qgate-bench-score-") as tmp:
        work = Path(tmp)
        shipped = {f: default_weights_path(f) for f in LEARNED_SCORERS}
        missing = [f for f, p in shipped.items() if args.random or not p.is_file()]
        weights: dict[str, Path | None] = {f: None for f in LEARNED_SCORERS}
        variants: dict[str, str | None] = {f: None for f in LEARNED_SCORERS}
        notes = []
        if args.weights_dir is not None:
            if not args.weights_dir.is_dir():
                ap.error(f"--weights-dir {args.weights_dir} is not a folder")
            for f in LEARNED_SCORERS:
                other = args.weights_dir / f"{f}.safetensors"
                if other.is_file() and f not in missing:
                    weights[f] = other.resolve()
            used = [f for f in LEARNED_SCORERS if weights[f] is not None]
            notes.append(f"weights from {args.weights_dir}: {', '.join(used) or 'none'}")
        if missing:
            rand = _random_weights(work / "weights", {f: chosen[f] for f in missing})
            for f, p in rand.items():
                weights[f], variants[f] = p, chosen[f]
            why = "--random" if args.random else "shipped weights missing"
            notes.append(
                f"RANDOM-INIT weights for {', '.join(missing)} ({why}): "
                "speed only, scores meaningless"
            )
        t0 = time.perf_counter()
        paths = write_series(make_ct_series(args.slices, args.size, args.size), work / "series")
        n = args.slices
        mb = sum(p.stat().st_size for p in paths) / 1e6

        sets = [s.strip() for s in args.sets.split(",") if s.strip()]
        rows = []
        wall, cpu = _time(lambda: load_series(paths), args.reps)
        rows.append(("decode only", wall, cpu))
        described: dict[str, dict[str, object]] = {}
        limits: dict[str, object] = {}
        streamed: list[tuple[str, float]] = []
        shape: PipelineShape | None = None
        for s in sets:
            names = list(LEARNED_SCORERS) if s == "all" else s.split("+")
            settings = _settings(names, args, weights, variants)
            scorers = build_scorers(settings)
            for sc in scorers:
                describe = getattr(sc, "describe", None)
                if describe is not None:
                    described[sc.name] = describe()
                    limits[sc.name] = getattr(getattr(sc, "config", None), "max_slices", "-")
            wall, cpu = _time(functools.partial(score_series, paths, scorers, []), args.reps)
            label = " + ".join(names) if s == "all" else s
            rows.append((label, wall, cpu))
            if args.stream and s in args.stream_sets.split(","):
                shape = pipeline_shape(settings)
                streamed.append((label, _stream(paths, scorers, shape, args.stream)))
            del scorers

    print(f"# qgate scoring benchmark: decode to results ({time.perf_counter() - t0:.0f} s)")
    print(
        f"series: {n} slices of {args.size} x {args.size} (synthetic chest phantom, "
        f"{mb:.0f} MB of Part 10 files); {args.reps} runs after 1 warm-up, median"
    )
    cpu_name = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    load = os.getloadavg()
    print(
        f"host: {os.cpu_count()} CPUs ({cpu_name}), load average {load[0]:.1f}; torch "
        f"{torch.__version__}, device {device} ({gpu}), torch threads "
        f"{torch.get_num_threads()}"
    )
    batch = args.batch_size or (CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE)
    per_model = ", ".join(f"{k} {'all' if v is None else v}" for k, v in limits.items())
    print(f"max_slices: {per_model}; batch size {batch}")
    for name, d in described.items():
        params = d["parameters"]
        assert isinstance(params, int)
        print(
            f"  {name}: {d['model']} {params / 1e6:.2f} M parameters, "
            f"{'bf16' if d['bf16'] else 'fp32'}, weights {Path(str(d['weights'])).name} "
            f"({d['version']})" + (f", variant {variants[name]}" if variants.get(name) else "")
        )
    for note in notes:
        print(f"NOTE: {note}")
    print()
    print("| scorers | s/series | s/slice | slices/s | CPU s/slice | CPU/wall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, cpu in rows:
        print(
            f"| {name} | {wall:.2f} | {wall / n:.4f} | {n / wall:.1f} | {cpu / n:.4f} | "
            f"{cpu / wall:.2f} |"
        )
    if streamed and shape is not None:
        print()
        print(
            f"Pipelined (the worker's decode-ahead): {args.stream} series of {n} slices, "
            f"prefetch {shape.prefetch}, decoder processes {shape.decode_processes}, "
            f"volumes staged on {shape.device or 'no device (host memory)'}"
        )
        print()
        print("| scorers | s/series | slices/s, decode to results |")
        print("| --- | ---: | ---: |")
        for name, wall in streamed:
            print(f"| {name} | {wall / args.stream:.2f} | {n * args.stream / wall:.1f} |")


if __name__ == "__main__":
    main()
