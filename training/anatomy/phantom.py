"""Procedural chest/abdomen phantoms: unlimited, randomised, noiseless anatomy in HU.

A *patient* is a seed. It fixes body size and shape, fat and muscle thickness, organ
positions and sizes, contrast phase, a lung vessel tree and the texture fields; slices are
then cut anywhere along the torso coordinate ``zeta`` (0 = lung apex, 1 = pelvis), so
neighbouring slices are consistent and short volumes are real 3-D stacks.

What is drawn, outside in: patient table; body outline (superellipse with lobulation and
a flatter back); skin; subcutaneous fat with septa; muscle wall; paraspinal muscles;
spine (cortex, cancellous bone, canal, discs, posterior elements), ribs, sternum,
scapulae; chest: lungs with parenchyma texture and a branching 3-D vessel tree, heart
with chambers, aorta, trachea and mediastinal fat; abdomen: liver with vessels, spleen,
stomach with gas and fluid, kidneys (cortex, medulla, sinus fat), pancreas, gallbladder,
aorta, IVC, bowel loops with gas and fluid in mesenteric fat; pelvis: iliac bones and
bladder. Organs are ellipsoids cut obliquely, so their sections grow and shrink along z.
Every organ gets a band-limited texture; edges are anti-aliased (partial volume).

HU values are textbook unenhanced values, or portal-venous ones when the patient draws
contrast. The phantom is noiseless: the simulator adds the full-dose noise itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.anatomy.base import AnatomyVolume

TORSO_MM = 620.0  # apex to pelvis at size 1


@dataclass(frozen=True)
class _Organ:
    """An ellipsoid along z: centre (x, y) in body units, semi-axes, zeta range, angle."""

    cx: float
    cy: float
    ax: float
    ay: float
    z0: float
    z1: float
    angle: float
    hu: float
    tex: float  # texture amplitude, HU


class PhantomPatient:
    """One randomised patient. ``PhantomPatient(seed).volume(...)`` draws HU slices."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        rng = np.random.default_rng([0x51A7, self.seed])
        self.rng_seed = int(rng.integers(2**31))
        u = rng.uniform
        # Body 27-36 cm wide: adults that fit the 358 mm field of a 512 x 0.7 mm image (a
        # larger patient would be reconstructed with a larger field, so is not drawn).
        self.size = u(0.85, 1.12)  # overall scale
        self.half_w = min(165.0, 155.0 * self.size * u(0.95, 1.03))  # abdomen half-width, mm
        self.ap_ratio = u(0.62, 0.8)
        self.chest_w = u(0.92, 1.02)  # chest width relative to abdomen
        self.fat_mm = u(6.0, 38.0) * self.size
        self.fat_abd = u(1.0, 1.8)  # more fat over the abdomen
        self.muscle_mm = u(5.0, 11.0)
        self.power = u(2.1, 2.8)  # superellipse exponent: boxier bodies
        self.lobes = (
            rng.normal(0, 0.006, size=(4, 2)) / np.arange(1, 5)[:, None]
        )  # low-order outline perturbation
        self.back_flat = u(0.1, 0.3)
        self.tilt = u(-0.06, 0.06)  # rad
        self.shift = (u(-8, 8), u(-6, 10))  # mm
        self.contrast = bool(rng.random() < 0.6)
        self.table = bool(rng.random() < 0.85)
        self.gut_fat = u(-0.6, 0.4)  # lower: less mesenteric fat
        self.diaphragm = u(0.40, 0.47)  # zeta of the lung bases
        self.heart = (u(0.07, 0.16), u(-0.12, 0.02), u(0.2, 0.26), u(0.17, 0.22))
        self.rib_phase = u(0, 1)
        self.rib_freq = u(9.0, 11.0)  # rib crossings along the chest
        self.disc_phase = u(0, 1)
        self.liver_hu = u(52, 64) + (u(40, 60) if self.contrast else 0.0)
        self.spleen_hu = u(42, 52) + (u(50, 70) if self.contrast else 0.0)
        self.blood_hu = u(35, 45) + (u(110, 170) if self.contrast else 0.0)
        self.kidney_hu = u(28, 36) + (u(100, 150) if self.contrast else 0.0)
        self.muscle_hu = u(45, 60)
        self.fat_hu = u(-115, -90)
        self.lung_hu = u(-880, -820)
        self.bone_cortex = u(900, 1300)
        self.bone_marrow = u(160, 300)
        self.organs = self._organs(rng)
        self.bowel = self._bowel(rng)
        self.vessels = self._vessel_tree(rng)

    # ------------------------------------------------------------------ random layout
    def _organs(self, rng: np.random.Generator) -> dict[str, _Organ]:
        def j(v: float, s: float) -> float:
            return float(v + rng.normal(0, s))

        d = self.diaphragm
        o = {
            "liver": _Organ(
                j(-0.32, 0.04),
                j(0.0, 0.05),
                j(0.42, 0.04),
                j(0.55, 0.05),
                d - 0.05,
                j(0.72, 0.03),
                j(-0.3, 0.1),
                self.liver_hu,
                8.0,
            ),
            "spleen": _Organ(
                j(0.5, 0.04),
                j(0.3, 0.05),
                j(0.14, 0.02),
                j(0.22, 0.03),
                d + 0.0,
                j(0.6, 0.03),
                j(0.6, 0.2),
                self.spleen_hu,
                6.0,
            ),
            "stomach": _Organ(
                j(0.3, 0.05),
                j(-0.25, 0.05),
                j(0.22, 0.03),
                j(0.18, 0.03),
                d + 0.01,
                j(0.6, 0.03),
                j(0.4, 0.2),
                25.0,
                5.0,
            ),
            "kidney_r": _Organ(
                j(-0.33, 0.03),
                j(0.48, 0.03),
                j(0.1, 0.01),
                j(0.15, 0.02),
                j(0.56, 0.02),
                j(0.74, 0.02),
                j(0.5, 0.15),
                self.kidney_hu,
                5.0,
            ),
            "kidney_l": _Organ(
                j(0.33, 0.03),
                j(0.46, 0.03),
                j(0.1, 0.01),
                j(0.15, 0.02),
                j(0.54, 0.02),
                j(0.72, 0.02),
                j(-0.5, 0.15),
                self.kidney_hu,
                5.0,
            ),
            "pancreas": _Organ(
                j(0.05, 0.03),
                j(0.12, 0.03),
                j(0.32, 0.03),
                j(0.06, 0.01),
                j(0.56, 0.02),
                j(0.63, 0.02),
                j(-0.15, 0.1),
                45.0 + (40.0 if self.contrast else 0.0),
                6.0,
            ),
            "gallbladder": _Organ(
                j(-0.22, 0.03),
                j(-0.2, 0.03),
                j(0.07, 0.01),
                j(0.1, 0.02),
                j(0.56, 0.02),
                j(0.64, 0.02),
                0.3,
                8.0,
                1.0,
            ),
            "bladder": _Organ(
                j(0.0, 0.03),
                j(-0.15, 0.04),
                j(0.22, 0.03),
                j(0.18, 0.03),
                j(0.9, 0.02),
                1.08,
                0.0,
                8.0,
                1.0,
            ),
        }
        return o

    def _bowel(self, rng: np.random.Generator) -> np.ndarray:
        """Loops as small ellipsoids: (cx, cy, r, zc, zh, gas fraction)."""
        n = int(rng.integers(90, 150))
        out = np.empty((n, 6))
        out[:, 0] = rng.uniform(-0.6, 0.6, n)
        out[:, 1] = rng.uniform(-0.55, 0.25, n)
        out[:, 2] = rng.uniform(0.05, 0.11, n)
        out[:, 3] = rng.uniform(0.6, 1.0, n)
        out[:, 4] = rng.uniform(0.02, 0.06, n)
        out[:, 5] = np.where(rng.random(n) < 0.3, rng.uniform(0.2, 0.8, n), 0.0)
        return out

    def _vessel_tree(self, rng: np.random.Generator) -> np.ndarray:
        """Lung vessels as 3-D segments (x0, y0, z0, x1, y1, z1, radius), body units / mm."""
        segs: list[tuple[float, ...]] = []
        for side in (-1.0, 1.0):
            hilum = np.array([side * 0.2, 0.05, self.diaphragm * 0.55])
            stack = [(hilum, rng.normal(0, 1, 3), 5.5, 0)]
            while stack:
                p, d, r, depth = stack.pop()
                d = d / (np.linalg.norm(d) + 1e-9)
                d[0] = abs(d[0]) * side * 0.7 + d[0] * 0.3  # mostly outwards
                length = (0.18 - 0.03 * depth) * rng.uniform(0.6, 1.2)
                q = p + d * length * np.array([1.0, 0.9, 0.35])
                segs.append((*p, *q, r))
                if depth < 5 and r > 0.9:
                    for _ in range(2):
                        stack.append(
                            (q, d + rng.normal(0, 0.7, 3), r * rng.uniform(0.62, 0.8), depth + 1)
                        )
        return np.array(segs, dtype=np.float64)

    # ------------------------------------------------------------------ drawing
    def volume(
        self,
        n_pixels: int = 512,
        pixel_mm: float = 0.7,
        *,
        zeta_start: float = 0.3,
        n_slices: int = 1,
        slice_mm: float = 2.5,
    ) -> AnatomyVolume:
        """``n_slices`` slices from ``zeta_start`` downwards, ``slice_mm`` apart."""
        dz = slice_mm / (TORSO_MM * self.size)
        zetas = zeta_start + dz * np.arange(n_slices)
        hu = self.slices(zetas, n_pixels, pixel_mm)
        mid = float(zetas.mean())
        region = "chest" if mid < self.diaphragm else "abdomen"
        return AnatomyVolume(
            hu=hu,
            pixel_mm=pixel_mm,
            slice_mm=slice_mm,
            patient_id=f"phantom-{self.seed}",
            source="phantom",
            region=region,
            noiseless=True,
            meta={
                "seed": self.seed,
                "zeta": [float(zetas[0]), float(zetas[-1])],
                "contrast": self.contrast,
            },
        )

    def slices(self, zetas: np.ndarray, n: int, px: float) -> np.ndarray:
        """HU slices (Z, n, n) at torso coordinates ``zetas``."""
        gen = torch.Generator().manual_seed(self.rng_seed)
        z = torch.as_tensor(np.asarray(zetas, dtype=np.float64), dtype=torch.float32)
        nz = z.numel()
        tex = _texture_fields(gen, nz, n, z, px)
        out = torch.empty(nz, n, n)
        for i in range(nz):
            out[i] = self._slice(float(z[i]), n, px, [t[i] for t in tex])
        return out.numpy().astype(np.float32)

    def _slice(self, zeta: float, n: int, px: float, tex: list[torch.Tensor]) -> torch.Tensor:
        c = (n - 1) / 2
        coord = (torch.arange(n, dtype=torch.float32) - c) * px
        yy, xx = torch.meshgrid(coord, coord, indexing="ij")
        # body frame: rotate by the tilt, remove the shift
        ca, sa = math.cos(self.tilt), math.sin(self.tilt)
        x = (xx - self.shift[0]) * ca + (yy - self.shift[1]) * sa
        y = -(xx - self.shift[0]) * sa + (yy - self.shift[1]) * ca
        aa = px  # edge width for anti-aliasing, mm
        fine, mid, coarse = tex

        chest = _smooth_step(self.diaphragm + 0.05 - zeta, 0.1)  # 1 in the chest
        pelvis = _smooth_step(zeta - 0.82, 0.06)
        half_w = self.half_w * (1 + (self.chest_w - 1) * chest) * (1 - 0.12 * _bump(zeta, 0.0, 0.1))
        half_h = half_w * self.ap_ratio * (1 + 0.06 * chest)
        # body outline: superellipse with lobulation and a flatter back (+y is posterior)
        theta = torch.atan2(y / half_h, x / half_w)
        lob = 1.0 + sum(
            self.lobes[k, 0] * torch.cos((k + 2) * theta)
            + self.lobes[k, 1] * torch.sin((k + 2) * theta)
            for k in range(4)
        )
        yb = torch.where(y > 0, y * (1 + self.back_flat), y)
        rho = ((x.abs() / half_w) ** self.power + (yb.abs() / half_h) ** self.power) ** (
            1 / self.power
        ) / lob
        scale = min(half_w, half_h)
        depth = (1 - rho) * scale  # ~ mm inside the skin
        body = _edge(depth, aa)

        img = torch.full((n, n), -1000.0)
        if self.table:
            ty = half_h * (1 + self.back_flat) ** -1 + 18.0
            tmask = _edge(6.0 - (y - ty - 0.0015 * x * x).abs(), aa) * _edge(
                1.15 * half_w - x.abs(), aa
            )
            img = _paint(img, tmask, -400.0 + 0.0 * fine)
        fat_mm = self.fat_mm * (1 + (self.fat_abd - 1) * (1 - chest))
        img = _paint(img, body, 30.0)  # skin
        img = _paint(img, _edge(depth - 2.0, aa), self.fat_hu + 6 * mid + 12 * (fine > 1.6))
        wall = _edge(depth - 2.0 - fat_mm, aa)
        img = _paint(img, wall, self.muscle_hu + 6 * fine)
        cavity = _edge(depth - 2.0 - fat_mm - self.muscle_mm, aa)
        inner = depth - 2.0 - fat_mm - self.muscle_mm  # mm inside the cavity wall
        # body units for organ placement: cavity half-extents
        cw = half_w - fat_mm - self.muscle_mm
        ch = half_h - fat_mm - self.muscle_mm
        u, v = x / cw, y / ch
        # cavity filling: mediastinal fat in the chest; in the abdomen a mixture of bowel
        # wall / mesentery (soft tissue) and fat, shaped by a thresholded texture field
        fill_fat = self.fat_hu + 15 + 8 * mid
        gut = torch.where(coarse + 0.6 * mid > self.gut_fat, 32.0 + 8 * fine, fill_fat)
        img = _paint(img, cavity, fill_fat + (1 - chest) * (gut - fill_fat))

        # -- chest ---------------------------------------------------------------------
        if zeta < self.diaphragm + 0.06:
            apex = _smooth_step(zeta - 0.01, 0.04)
            base = 1 - _smooth_step(zeta - self.diaphragm, 0.015)
            lung_w = 0.42 * apex * base
            lung_masks = torch.zeros_like(u)
            for side in (-1.0, 1.0):
                lx = side * (0.52 + 0.03 * (side > 0))  # the heart pushes the left lung out
                lung = _ellipse(u, v, lx, 0.05, lung_w * 0.9, 0.82 * apex, side * 0.08, aa / cw)
                lung = lung * _edge(inner - 3.0, aa)
                hollow = self.lung_hu + 25 * fine + 15 * coarse
                img = _paint(img, lung, hollow)
                lung_masks = torch.maximum(lung_masks, lung)
            hx, hy, ha, hb = self.heart
            hz = _bump(zeta, self.diaphragm - 0.1, 0.13)
            if hz > 0.02:
                heart = _ellipse(
                    u, v, hx, hy, ha * 1.6 * hz**0.5, hb * 1.7 * hz**0.5, -0.5, aa / cw
                )
                img = _paint(img, heart, 45.0 + 4 * fine)
                chamber = _ellipse(
                    u,
                    v,
                    hx + 0.02,
                    hy + 0.01,
                    ha * 0.9 * hz**0.5,
                    hb * 0.9 * hz**0.5,
                    -0.5,
                    aa / cw,
                )
                img = _paint(img, chamber, self.blood_hu + 3 * fine)
            if zeta < 0.22:  # trachea
                tr = _ellipse(u, v, 0.0, -0.1, 0.07, 0.08, 0.0, aa / cw)
                img = _paint(img, tr, 35.0)
                img = _paint(img, _ellipse(u, v, 0.0, -0.1, 0.055, 0.065, 0.0, aa / cw), -990.0)
            # lung vessels: the 3-D tree cut at this zeta, only inside the lungs
            ves = self._vessels_at(zeta, x / cw, y / ch, cw, aa)
            img = _paint(img, ves * lung_masks, self.blood_hu)
            # ribs: sections along the inner wall, appearing periodically with zeta
            img = self._ribs(img, zeta, u, v, inner, cw, aa, fine)
            if 0.05 < zeta < 0.4:  # sternum
                st = _ellipse(u, v, 0.0, -1.0 + 0.06, 0.09, 0.05, 0.0, aa / cw)
                img = _bone(
                    img,
                    st,
                    _ellipse(u, v, 0.0, -0.94, 0.06, 0.03, 0.0, aa / cw),
                    self.bone_cortex,
                    self.bone_marrow,
                    fine,
                )
            if zeta < 0.25:  # scapulae, in the back muscles
                for side in (-1.0, 1.0):
                    sc = _ellipse(u, v, side * 0.78, 1.08, 0.25, 0.03, side * 0.45, aa / cw)
                    sc = sc * _smooth_step(0.25 - zeta, 0.05) * wall
                    img = _paint(img, sc, self.bone_cortex * 0.7)
        # -- abdomen -------------------------------------------------------------------
        org = self.organs
        for name in (
            "liver",
            "spleen",
            "stomach",
            "pancreas",
            "gallbladder",
            "kidney_r",
            "kidney_l",
            "bladder",
        ):
            o = org[name]
            m = _organ_section(o, zeta, u, v, aa / cw)
            if m is None:
                continue
            m = m * cavity
            img = _paint(img, m, o.hu + o.tex * mid + 0.5 * o.tex * fine)
            if name == "stomach":  # gas cap anteriorly (-y), fluid below
                gas = m * _edge(-(v - (o.cy - 0.05)) * ch, aa)
                img = _paint(img, gas, -990.0)
            if name.startswith("kidney"):
                sinus = _organ_section(
                    _Organ(
                        o.cx + 0.03 * np.sign(-o.cx),
                        o.cy,
                        o.ax * 0.45,
                        o.ay * 0.4,
                        o.z0 + 0.02,
                        o.z1 - 0.02,
                        o.angle,
                        -60.0,
                        5.0,
                    ),
                    zeta,
                    u,
                    v,
                    aa / cw,
                )
                if sinus is not None:
                    img = _paint(img, sinus, -60.0 + 20 * fine)
            if name == "liver":  # hepatic / portal veins as darker or brighter tubes
                hv = _tubes(u, v, zeta, self.seed, o, aa / cw)
                img = _paint(img, hv * m, self.blood_hu - (10.0 if not self.contrast else 0.0))
        # bowel loops
        if zeta > 0.55:
            b = self.bowel
            w = np.clip(1 - ((zeta - b[:, 3]) / b[:, 4]) ** 2, 0, None)
            for i in np.nonzero(w > 0)[0]:
                r = b[i, 2] * math.sqrt(w[i])
                loop = _ellipse(u, v, b[i, 0], b[i, 1], r, r * 0.85, 0.0, aa / cw) * cavity
                img = _paint(img, loop, 35.0 + 6 * fine)
                lumen = _ellipse(u, v, b[i, 0], b[i, 1], r * 0.7, r * 0.6, 0.0, aa / cw)
                img = _paint(img, lumen * cavity, 12.0 + 5 * mid)
                if b[i, 5] > 0:  # gas rises anteriorly
                    gas = lumen * _edge(-(v - (b[i, 1] - r * (1 - 2 * b[i, 5]))) * ch, aa)
                    img = _paint(img, gas * cavity, -990.0)
        # great vessels anterior to the spine
        aorta = _ellipse(u, v, 0.1, 0.48, 0.075, 0.1, 0.0, aa / cw) * _smooth_step(
            zeta - 0.08, 0.02
        )
        img = _paint(img, aorta, self.blood_hu + 2 * fine)
        if zeta > self.diaphragm - 0.05:
            ivc = _ellipse(u, v, -0.14, 0.42, 0.09, 0.07, 0.0, aa / cw)
            img = _paint(img, ivc, self.blood_hu - (20.0 if self.contrast else 0.0))
        # paraspinal muscles and the spine
        for side in (-1.0, 1.0):
            ps = _ellipse(u, v, side * 0.2, 0.93, 0.16, 0.13, 0.0, aa / cw)
            img = _paint(img, ps * wall, self.muscle_hu + 5 * fine)
        img = self._spine(img, zeta, u, v, cw, aa, fine, wall)
        if pelvis > 0.02:  # iliac wings
            for side in (-1.0, 1.0):
                il = _ellipse(u, v, side * 0.62, 0.5, 0.3 * pelvis, 0.09, side * 0.6, aa / cw)
                il = il * wall
                img = _bone(
                    img,
                    il,
                    _ellipse(u, v, side * 0.62, 0.5, 0.26 * pelvis, 0.055, side * 0.6, aa / cw),
                    self.bone_cortex,
                    self.bone_marrow,
                    fine,
                )
        return img

    def _vessels_at(
        self, zeta: float, ub: torch.Tensor, vb: torch.Tensor, cw: float, aa: float
    ) -> torch.Tensor:
        seg = self.vessels
        z0, z1 = seg[:, 2], seg[:, 5]
        near = (np.minimum(z0, z1) <= zeta + 0.01) & (np.maximum(z0, z1) >= zeta - 0.01)
        out = torch.zeros_like(ub)
        if not near.any():
            return out
        s = torch.as_tensor(seg[near], dtype=torch.float32)
        # the point of each segment at this zeta (segments are nearly in-plane, so clamp)
        dz = s[:, 5] - s[:, 2]
        t = (zeta - s[:, 2]) / torch.where(dz.abs() < 1e-6, torch.full_like(dz, 1e-6), dz)
        t = t.clamp(0, 1)
        # in-plane: distance from each pixel to the segment's sub-piece around that point
        px0 = s[:, 0] + (s[:, 3] - s[:, 0]) * (t - 0.15).clamp(0, 1)
        py0 = s[:, 1] + (s[:, 4] - s[:, 1]) * (t - 0.15).clamp(0, 1)
        px1 = s[:, 0] + (s[:, 3] - s[:, 0]) * (t + 0.15).clamp(0, 1)
        py1 = s[:, 1] + (s[:, 4] - s[:, 1]) * (t + 0.15).clamp(0, 1)
        r_mm = s[:, 6]
        for i in range(s.shape[0]):  # a few dozen segments per slice
            ax, ay = float(px0[i]), float(py0[i])
            bx, by = float(px1[i]), float(py1[i])
            dx, dy = bx - ax, by - ay
            ll = dx * dx + dy * dy + 1e-9
            tt = (((ub - ax) * dx + (vb - ay) * dy) / ll).clamp(0, 1)
            d = torch.hypot(ub - ax - tt * dx, vb - ay - tt * dy) * cw  # mm
            out = torch.maximum(out, _edge(float(r_mm[i]) - d, aa))
        return out

    def _ribs(
        self,
        img: torch.Tensor,
        zeta: float,
        u: torch.Tensor,
        v: torch.Tensor,
        inner: torch.Tensor,
        cw: float,
        aa: float,
        fine: torch.Tensor,
    ) -> torch.Tensor:
        """Rib sections: flat ovals along the inner chest wall, coming and going with zeta
        (ribs run obliquely, so each crosses a given slice only over a short range)."""
        if zeta > self.diaphragm + 0.08:
            return img
        n_ribs = 20
        p = self.power
        for k in range(n_ribs):
            a = -math.pi + (k + 0.5) * 2 * math.pi / n_ribs
            if abs(math.cos(a)) < 0.25 and math.sin(a) > 0:
                continue  # no ribs across the spine
            phase = (zeta * self.rib_freq + self.rib_phase + 0.37 * k) % 1.0
            if phase > 0.45:
                continue
            ca, sa = math.cos(a), math.sin(a)
            r = (abs(ca) ** p + abs(sa) ** p) ** (-1 / p) * 1.02  # on the cavity outline
            cx, cy = r * ca, r * sa * (1 + self.back_flat * (sa > 0)) ** -1
            length = 0.05 + 0.07 * math.sin(math.pi * phase / 0.45)
            outer = _ellipse(u, v, cx, cy, length, 0.045, a + math.pi / 2, aa / cw)
            core = _ellipse(u, v, cx, cy, length * 0.75, 0.025, a + math.pi / 2, aa / cw)
            img = _bone(img, outer, core, self.bone_cortex * 0.9, self.bone_marrow, fine)
        return img

    def _spine(
        self,
        img: torch.Tensor,
        zeta: float,
        u: torch.Tensor,
        v: torch.Tensor,
        cw: float,
        aa: float,
        fine: torch.Tensor,
        wall: torch.Tensor,
    ) -> torch.Tensor:
        r = (16.0 + 8.0 * zeta) / cw  # vertebral body radius grows towards the lumbar spine
        vy = 0.72
        disc = ((zeta * TORSO_MM * self.size / 28.0 + self.disc_phase) % 1.0) < 0.22
        body = _ellipse(u, v, 0.0, vy, r * 1.1, r, 0.0, aa / cw)
        if disc:
            img = _paint(img, body, 85.0 + 5 * fine)
        else:
            img = _bone(
                img,
                body,
                _ellipse(u, v, 0.0, vy, r * 0.9, r * 0.8, 0.0, aa / cw),
                self.bone_cortex,
                self.bone_marrow,
                fine,
            )
        # posterior elements: pedicles/laminae ring around the canal, spinous process
        ring = _ellipse(u, v, 0.0, vy + 1.9 * r, r * 0.95, r * 0.85, 0.0, aa / cw)
        canal = _ellipse(u, v, 0.0, vy + 1.85 * r, r * 0.6, r * 0.55, 0.0, aa / cw)
        img = _paint(img, ring, self.bone_cortex * 0.8 + 40 * fine)
        img = _paint(img, canal, 15.0 + 3 * fine)
        sp = _ellipse(u, v, 0.0, vy + 3.0 * r, r * 0.22, r * 0.7, 0.0, aa / cw) * wall
        return _paint(img, sp, self.bone_cortex * 0.75)


# ---------------------------------------------------------------------- helpers
def _smooth_step(x: float, width: float) -> float:
    return float(1 / (1 + math.exp(-x / max(width, 1e-6) * 4)))


def _bump(x: float, centre: float, half: float) -> float:
    return max(0.0, 1 - ((x - centre) / half) ** 2)


def _edge(inside_mm: torch.Tensor, width: float) -> torch.Tensor:
    """Soft mask from a signed distance-like field (>0 inside), one edge width wide."""
    return torch.clamp(inside_mm / width + 0.5, 0.0, 1.0)


def _paint(img: torch.Tensor, mask: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    return img + mask * (value - img)


def _bone(
    img: torch.Tensor,
    outer: torch.Tensor,
    inner: torch.Tensor,
    cortex: float,
    marrow: float,
    fine: torch.Tensor,
) -> torch.Tensor:
    img = _paint(img, outer, cortex + 60 * fine)
    return _paint(img, inner, marrow + 60 * fine)


def _ellipse(
    u: torch.Tensor,
    v: torch.Tensor,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    angle: float,
    aa: float,
) -> torch.Tensor:
    """Soft ellipse mask in body units; ``aa`` is the edge width in the same units."""
    if ax <= 0 or ay <= 0:
        return torch.zeros_like(u)
    ca, sa = math.cos(angle), math.sin(angle)
    du, dv = u - cx, v - cy
    p = (du * ca + dv * sa) / ax
    q = (-du * sa + dv * ca) / ay
    r = torch.sqrt(p * p + q * q)
    return _edge((1 - r) * min(ax, ay), aa)


def _organ_section(
    o: _Organ, zeta: float, u: torch.Tensor, v: torch.Tensor, aa: float
) -> torch.Tensor | None:
    if not o.z0 < zeta < o.z1:
        return None
    t = (zeta - o.z0) / (o.z1 - o.z0)
    s = math.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))
    if s < 0.05:
        return None
    # slight drift of the centre along z: oblique ellipsoids
    return _ellipse(
        u, v, o.cx + 0.05 * (t - 0.5), o.cy - 0.05 * (t - 0.5), o.ax * s, o.ay * s, o.angle, aa
    )


def _tubes(
    u: torch.Tensor, v: torch.Tensor, zeta: float, seed: int, o: _Organ, aa: float
) -> torch.Tensor:
    """A few vessel sections inside an organ (deterministic per patient and zeta band)."""
    rng = np.random.default_rng([seed, int(zeta * 40)])
    out = torch.zeros_like(u)
    for _ in range(int(rng.integers(3, 8))):
        cx = o.cx + rng.uniform(-0.6, 0.6) * o.ax
        cy = o.cy + rng.uniform(-0.6, 0.6) * o.ay
        r = rng.uniform(0.012, 0.035)
        out = torch.maximum(
            out, _ellipse(u, v, cx, cy, r * rng.uniform(1, 2.5), r, rng.uniform(0, math.pi), aa)
        )
    return out


def _texture_fields(
    gen: torch.Generator, nz: int, n: int, z: torch.Tensor, px: float
) -> list[torch.Tensor]:
    """Three unit-variance band-limited Gaussian fields (Z, n, n): fine, mid, coarse.

    Correlation lengths ~1.5, 5 and 20 mm in-plane. Drawn on a coarse grid and upsampled,
    and smooth along z (the zeta grid is a 3-D lattice), so slices of a volume agree.
    """
    out = []
    for corr_mm in (1.5, 5.0, 20.0):
        step = max(corr_mm / px, 1.0)
        m = max(4, math.ceil(n / step) + 3)
        zc = max(2, nz // max(1, round(corr_mm / 2.5)) + 2)
        base = torch.randn(1, 1, zc, m, m, generator=gen)
        base = _blur3(base)
        vol = F.interpolate(base, size=(max(nz, 1), n, n), mode="trilinear", align_corners=False)
        vol = vol[0, 0]
        vol = (vol - vol.mean()) / (vol.std() + 1e-6)
        out.append(vol)
    return out


def _blur3(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.25, 0.5, 0.25])
    for dim in (2, 3, 4):
        shape = [1, 1, 1, 1, 1]
        shape[dim] = 3
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def make_phantom_volume(
    seed: int,
    *,
    n_pixels: int = 512,
    pixel_mm: float = 0.7,
    zeta_start: float | None = None,
    n_slices: int = 1,
    slice_mm: float = 2.5,
    region: str | None = None,
) -> AnatomyVolume:
    """A phantom volume for patient ``seed``; ``zeta_start`` random in ``region`` if omitted."""
    patient = PhantomPatient(seed)
    if zeta_start is None:
        rng = np.random.default_rng([0xBEEF, seed, n_slices])
        lo, hi = {
            "chest": (0.08, patient.diaphragm - 0.05),
            "abdomen": (patient.diaphragm + 0.02, 0.85),
        }.get(region or "", (0.08, 0.85))
        zeta_start = float(rng.uniform(lo, hi))
    return patient.volume(
        n_pixels, pixel_mm, zeta_start=zeta_start, n_slices=n_slices, slice_mm=slice_mm
    )
