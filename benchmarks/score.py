"""Scoring throughput of the learned scorers, from decode to results.

Writes one synthetic CT series (qgate.synth, Part 10 files), builds each scorer set once
through the pipeline (``build_scorers``, as the worker does) and times
``qgate.pipeline.score_series`` on the files: read and decode every instance, HU volume,
the scorers (preprocessing, model, post-processing) and the gate decision. The report
objects (SR, SC, PM) are not included. One warm-up run, then the median of ``--reps``
runs; CPU time is the process's user + system time over the same runs (all threads), so
CPU / wall > 1 means several cores were busy.

The shipped weights (qgate/weights/) are used when present; otherwise (or with
``--random``) random-init weights of the chosen variants are written to a temporary folder
and the output says so (the speed is that of the variant; the scores are meaningless).

    .venv/bin/python benchmarks/score.py --slices 200 --threads 2
    .venv/bin/python benchmarks/score.py --device cuda --slices 512 --batch-size 64 \\
        --max-slices all --variants mdiqa_small,n2q_small,chestiqa_small
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

from qgate.config import Settings, load_settings
from qgate.pipeline import LEARNED_SCORERS, build_scorers, score_series
from qgate.scoring.learned import default_weights_path, resolve_device
from qgate.synth import make_ct_series, write_series
from qgate.volume import load_series

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
    max_slices = None if args.max_slices == "all" else int(args.max_slices)
    per_model: dict[str, dict[str, object]] = {}
    for family in LEARNED_SCORERS:
        cfg: dict[str, object] = {
            "weights": weights[family],
            "variant": variants[family],
            "amp": not args.fp32,
        }
        if family != "chestiqa":
            cfg |= {"batch_size": args.batch_size, "max_slices": max_slices}
        per_model[family] = cfg
    return load_settings(
        path=None,
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fp32", action="store_true", help="amp off: fp32 on CPU and CUDA")
    ap.add_argument(
        "--random", action="store_true", help="random-init weights even if shipped ones exist"
    )
    ap.add_argument(
        "--max-slices", default="64", help="slices the per-slice models score, or 'all'"
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated entry points for random-init weights, e.g. mdiqa_tiny,"
        "n2q_tiny,chestiqa_tiny (default: tiny on CPU, small on CUDA)",
    )
    ap.add_argument(
        "--sets",
        default="mdiqa,n2q,chestiqa,all",
        help="scorer sets to time: names, 'all' = the three learned scorers",
    )
    args = ap.parse_args()
    if args.max_slices != "all" and int(args.max_slices) < 2:
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
        for s in sets:
            names = list(LEARNED_SCORERS) if s == "all" else s.split("+")
            settings = _settings(names, args, weights, variants)
            scorers = build_scorers(settings)
            for sc in scorers:
                describe = getattr(sc, "describe", None)
                if describe is not None:
                    described[sc.name] = describe()
            wall, cpu = _time(functools.partial(score_series, paths, scorers, []), args.reps)
            rows.append((" + ".join(names) if s == "all" else s, wall, cpu))
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
    print(f"max_slices {args.max_slices}, batch size {args.batch_size}")
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


if __name__ == "__main__":
    main()
