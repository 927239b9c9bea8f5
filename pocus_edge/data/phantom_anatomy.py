"""Anatomy of the wrist phantom: patients, views, sweeps, and exact column-wise rasterization.

Geometry lives in *world* millimetres of one longitudinal (sagittal-ish) plane through the
distal radius: ``x`` runs proximal (negative) to distal (positive) with the physis (growth
plate) centred at ``x = 0``; ``z`` is depth below the skin. Bones are closed polygons with a
label (1 metaphysis, 2 epiphysis, 3 carpal bones); soft tissues (tendons, pronator
quadratus, cartilage) are polygons painted in order; skin and subcutaneous fat are layers
that conform to the probe face.

A sweep moves the probe out of plane (elevation ``y``, which also changes the anatomy
smoothly between two sampled states) and a little in plane (slide ``x0`` and heel-toe tilt
``theta``). Probe coordinates: ``x_p`` across the aperture (0 at its centre), ``z_p`` down
the beam; the probe pivots about the skin point under its centre.

Rasterization is column-wise and exact: for each image column (one beam line, a pixel
centre ``x``) the crossings of that vertical line with every polygon edge are computed, so a
pixel belongs to a polygon iff its centre lies inside it (even-odd rule, half-open edges).
The *labeled* bone is defined along the beam, the way a sonographer sees it: the part of
each bone within ``cortex_mm`` of bone path length below the first bone surface the beam
meets (the bright cortical echo band); deeper bone is in the acoustic shadow and is not
labeled. The image's bright cortex is painted from the very same band, so masks are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------------
# Tissues. Echogenicity is the mean backscattered power relative to generic soft tissue;
# attenuation in dB/(mm MHz), one way (soft tissue ~0.05-0.1, bone an order of magnitude more).
DEEP, SKIN, FAT, TENDON, MUSCLE, CARTILAGE, BONE, CORTEX, FASCIA = range(9)
TISSUE_NAMES = ("soft tissue", "skin", "fat", "tendon", "muscle", "cartilage", "bone", "cortex", "fascia")
# Fascia (retinaculum, tendon sheaths, muscle fascia) is a thin bright line like the bone
# surface but casts no shadow: the confounder that makes bone segmentation non-trivial.
ECHOGENICITY = np.array([0.55, 1.6, 0.22, 1.3, 0.45, 0.015, 0.25, 14.0, 6.0], dtype=np.float32)
ATTENUATION_DB_PER_MM_MHZ = np.array([0.065, 0.08, 0.055, 0.09, 0.09, 0.05, 1.6, 0.45, 0.1], dtype=np.float32)
# Strength of the tissue-fixed texture (log-normal modulation of echogenicity): tendon fibrils,
# muscle striations, fat septa.
TEXTURE_STRENGTH = np.array([0.45, 0.3, 1.0, 0.8, 0.7, 0.0, 0.3, 0.25, 0.9], dtype=np.float32)
SPECULAR_REFLECTIVITY = 10.0  # coherent bone-surface echo, relative to unit-echogenicity speckle

SOURCE_VIEWS = ("dorsal", "proximal_dorsal", "radial", "volar", "proximal_volar")
TARGET_VIEWS = ("dorsal", "proximal_dorsal", "volar", "proximal_volar")  # no radial view (paper)
LABELS = {1: "metaphysis", 2: "epiphysis", 3: "carpal"}

WORLD_X_MIN, WORLD_X_MAX = -50.0, 50.0  # covers every view's probe positions with margin
BONE_BOTTOM_MM = 9.0  # polygons extend this far below the bone surface (deep in the shadow)


@dataclass
class Patient:
    """Patient-level anatomy (mm); sampled once per patient, shared by all views."""

    pid: str
    size: float
    skin_mm: float
    fat_mm: float
    tendon_mm: float
    muscle_mm: float
    physis_gap_mm: float
    flare_drop_mm: float
    flare_len_mm: float
    epi_len_mm: float
    epi_height_mm: float
    epi_drop_mm: float
    cap_mm: float
    carpal_gap_mm: float
    carpal_len_mm: float
    carpal_height_mm: float
    carpal_depth_mm: float
    carpal_cartilage_mm: float
    cortex_mm: float
    fracture: str  # none | buckle | break
    fracture_x_mm: float
    fracture_size_mm: float
    fracture_width_mm: float


def sample_patient(pid: str, rng: np.random.Generator) -> Patient:
    """Children 4-16 years: ``size`` scales the skeleton; younger = wider physis, more cartilage."""
    size = float(rng.uniform(0.75, 1.15))
    youth = (1.15 - size) / 0.4  # 1 = youngest, 0 = oldest
    fracture = str(rng.choice(["none", "buckle", "break"], p=[0.55, 0.28, 0.17]))
    return Patient(
        pid=pid,
        size=size,
        skin_mm=float(rng.uniform(0.9, 1.5)),
        fat_mm=float(rng.uniform(0.8, 3.2)),
        tendon_mm=float(rng.uniform(1.4, 2.8) * size),
        muscle_mm=float(rng.uniform(2.5, 5.5) * size),
        physis_gap_mm=float(rng.uniform(0.9, 1.6) + 1.0 * youth),
        flare_drop_mm=float(rng.uniform(1.0, 2.6) * size),
        flare_len_mm=float(rng.uniform(9.0, 16.0) * size),
        epi_len_mm=float(rng.uniform(8.0, 13.0) * size),
        epi_height_mm=float(rng.uniform(0.8, 2.2) * size),
        epi_drop_mm=float(rng.uniform(-0.4, 1.2)),
        cap_mm=float(rng.uniform(0.6, 1.2) + 0.8 * youth),
        carpal_gap_mm=float(rng.uniform(1.5, 3.0) + 1.0 * youth),
        carpal_len_mm=float(rng.uniform(5.0, 8.5) * size),
        carpal_height_mm=float(rng.uniform(2.0, 3.5) * size),
        carpal_depth_mm=float(rng.uniform(0.8, 3.0)),
        carpal_cartilage_mm=float(rng.uniform(0.4, 0.9) + 1.0 * youth),
        cortex_mm=float(rng.uniform(1.0, 1.5)),
        fracture=fracture,
        fracture_x_mm=float(-rng.uniform(2.5, 9.0) * size),
        fracture_size_mm=float(rng.uniform(0.6, 1.6)),
        fracture_width_mm=float(rng.uniform(1.5, 3.5)),
    )


@dataclass
class ViewSpec:
    center_x: tuple[float, float]  # probe centre range along the bone (mm)
    bone_gap: tuple[float, float]  # soft tissue between the tendons/muscle and the bone
    tendons: bool
    muscle: bool
    epi_scale: float = 1.0
    carpals: int = 2


VIEW_SPECS = {
    "dorsal": ViewSpec(center_x=(0.0, 5.0), bone_gap=(0.2, 0.8), tendons=True, muscle=False),
    "proximal_dorsal": ViewSpec(center_x=(-19.0, -14.0), bone_gap=(0.3, 1.2), tendons=True, muscle=False),
    "radial": ViewSpec(center_x=(1.0, 6.0), bone_gap=(0.3, 1.0), tendons=True, muscle=False, epi_scale=1.35, carpals=1),
    "volar": ViewSpec(center_x=(-2.0, 3.0), bone_gap=(0.2, 0.6), tendons=True, muscle=True),
    "proximal_volar": ViewSpec(center_x=(-19.0, -14.0), bone_gap=(0.2, 0.6), tendons=True, muscle=True),
}


@dataclass
class Geometry:
    """One frame's anatomy: polygons as (N, 2) arrays of (x, z) mm."""

    skin_mm: float
    fat_mm: float
    cortex_mm: float
    soft: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (polygon, tissue), painted in order
    bones: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (polygon, label)

    def transformed(self, pose: "Pose") -> "Geometry":
        """The same anatomy in probe coordinates (skin and fat conform to the probe face)."""
        return Geometry(
            skin_mm=self.skin_mm,
            fat_mm=self.fat_mm,
            cortex_mm=self.cortex_mm,
            soft=[(pose.world_to_probe(p), t) for p, t in self.soft],
            bones=[(pose.world_to_probe(p), lab) for p, lab in self.bones],
        )


@dataclass
class Pose:
    """Probe pose: centre ``x0`` on the skin (mm), in-plane tilt ``theta`` (rad), elevation ``y``."""

    x0: float
    theta: float
    y: float

    def world_to_probe(self, pts: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx = pts[:, 0] - self.x0
        dz = pts[:, 1]
        return np.stack([c * dx + s * dz, -s * dx + c * dz], axis=1)

    def probe_to_world_matrix(self) -> np.ndarray:
        """2x3 affine matrix mapping probe (x, z) to world (x, z)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        return np.array([[c, -s, self.x0], [s, c, 0.0]])


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _ellipse(xc: float, zc: float, a: float, b: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([xc + a * np.cos(t), zc + b * np.sin(t)], axis=1)


def _band(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Polygon between two curves sampled at the same xs."""
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bottom[::-1]], 1)])


def _bone_polygon(xs: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Bone below a surface curve. The sides narrow with depth (by more than any probe tilt),
    so a beam can enter the bone only through its surface, never through a deep corner."""
    bottom = float(np.max(top)) + BONE_BOTTOM_MM
    inset = 0.2 * (bottom - top[[0, -1]])
    inset = np.minimum(inset, 0.45 * (xs[-1] - xs[0]))
    base = np.array([[xs[-1] - inset[1], bottom], [xs[0] + inset[0], bottom]])
    return np.concatenate([np.stack([xs, top], 1), base])


# Sweep-varying anatomy: these keys are sampled twice (sweep start and end) and interpolated.
_STATE_KEYS = ("fat_mm", "tendon_mm", "muscle_mm", "bone_gap_mm", "epi_height_mm", "epi_drop_mm", "carpal_depth_mm", "undulation_phase")


@dataclass
class SweepPlan:
    """A probe-independent plan of one cine sweep: anatomy states and probe path."""

    patient: Patient
    view: str
    n_frames: int
    state_a: dict[str, float]
    state_b: dict[str, float]
    center_x: float
    slide_mm: float
    theta0: float
    dtheta: float
    wobble_mm: float
    wobble_phase: float
    sweep_step_mm: float

    def _u(self, i: int) -> float:
        return i / max(self.n_frames - 1, 1)

    def pose(self, i: int) -> Pose:
        u = self._u(i)
        x0 = self.center_x + self.slide_mm * (u - 0.5) + self.wobble_mm * math.sin(2 * math.pi * u + self.wobble_phase)
        return Pose(x0=x0, theta=self.theta0 + self.dtheta * (u - 0.5), y=i * self.sweep_step_mm)

    @property
    def sweep_length_mm(self) -> float:
        return (self.n_frames - 1) * self.sweep_step_mm

    def x_range(self, half_width: float, depth: float) -> tuple[float, float]:
        """World x covered by the probe over the whole sweep (with tilt)."""
        poses = [self.pose(i) for i in range(self.n_frames)]
        reach = half_width + depth * max(abs(math.sin(p.theta)) for p in poses) + 1.0
        return min(p.x0 for p in poses) - reach, max(p.x0 for p in poses) + reach

    def geometry(self, i: int) -> Geometry:
        u = float(_smoothstep(np.array(self._u(i))))
        st = {k: self.state_a[k] + (self.state_b[k] - self.state_a[k]) * u for k in _STATE_KEYS}
        return build_geometry(self.patient, self.view, st)


def plan_sweep(patient: Patient, view: str, n_frames: int, rng: np.random.Generator, *, sweep_step_mm: float = 0.3) -> SweepPlan:
    spec = VIEW_SPECS[view]
    volar = view.endswith("volar")

    def state() -> dict[str, float]:
        return {
            "fat_mm": patient.fat_mm * rng.uniform(0.85, 1.15) + (1.0 if volar else 0.0),
            "tendon_mm": patient.tendon_mm * rng.uniform(0.8, 1.2),
            "muscle_mm": patient.muscle_mm * rng.uniform(0.85, 1.15),
            "bone_gap_mm": rng.uniform(*spec.bone_gap),
            "epi_height_mm": patient.epi_height_mm * spec.epi_scale * rng.uniform(0.75, 1.2),
            "epi_drop_mm": patient.epi_drop_mm + rng.uniform(-0.4, 0.4),
            "carpal_depth_mm": patient.carpal_depth_mm + rng.uniform(-0.6, 0.6),
            "undulation_phase": rng.uniform(0, 2 * np.pi),
        }

    a = state()
    b = {k: a[k] + 0.5 * (v - a[k]) for k, v in state().items()}  # end state: halfway to another draw
    return SweepPlan(
        patient=patient,
        view=view,
        n_frames=n_frames,
        state_a=a,
        state_b=b,
        center_x=float(rng.uniform(*spec.center_x)),
        slide_mm=float(rng.uniform(-2.0, 2.0)),
        theta0=float(np.deg2rad(rng.uniform(-3.0, 3.0))),
        # Tilt changes the depth (so the speckle phase) of lateral scatterers: keep it gentle.
        dtheta=float(np.deg2rad(rng.uniform(-1.5, 1.5))),
        wobble_mm=float(rng.uniform(0.0, 0.3)),
        wobble_phase=float(rng.uniform(0, 2 * np.pi)),
        sweep_step_mm=float(sweep_step_mm),
    )


def build_geometry(p: Patient, view: str, st: dict[str, float]) -> Geometry:
    """Polygons of one view for the anatomy state ``st`` (see ``_STATE_KEYS``)."""
    spec = VIEW_SPECS[view]
    top_soft = p.skin_mm + st["fat_mm"]
    xs = np.arange(WORLD_X_MIN, WORLD_X_MAX + 1e-9, 1.0)
    undulation = 0.25 * np.sin(xs / 7.0 + st["undulation_phase"])
    soft: list[tuple[np.ndarray, int]] = []
    depth = top_soft
    fascia_mm = 0.15 + 0.1 * p.size
    # Superficial fascia / retinaculum on top of the tendons (or the muscle).
    soft_fascia = [_band(xs, top_soft - 0.05 + undulation, top_soft - 0.05 + undulation + fascia_mm)]
    if spec.tendons:
        t_top = top_soft + 0.1 + undulation
        t_bot = t_top + st["tendon_mm"]
        soft.append((_band(xs, t_top, t_bot), TENDON))
        depth = top_soft + 0.1 + st["tendon_mm"]
        if spec.muscle:  # the fascia between the flexor tendons and pronator quadratus
            soft_fascia.append(_band(xs, t_bot, t_bot + fascia_mm))
    bone_z = depth + (st["muscle_mm"] if spec.muscle else 0.0) + st["bone_gap_mm"]
    half_gap = p.physis_gap_mm / 2

    # Metaphysis (label 1): flares toward the skin as it nears the physis; fracture per patient.
    mx = np.arange(WORLD_X_MIN, -half_gap, 0.5)
    mx = np.append(mx, -half_gap)
    top = bone_z + p.flare_drop_mm * _smoothstep(-mx / p.flare_len_mm) + 0.03 * np.maximum(-mx - p.flare_len_mm, 0)
    fragments: list[tuple[np.ndarray, np.ndarray]] = []
    if p.fracture == "buckle":
        t = np.abs(mx - p.fracture_x_mm) / p.fracture_width_mm
        top = top - p.fracture_size_mm * np.clip(1 - t, 0, 1) ** 1.5
        fragments.append((mx, top))
    elif p.fracture == "break":
        gap = 0.25 + 0.35 * p.fracture_size_mm
        near = mx <= p.fracture_x_mm - gap / 2
        far = mx >= p.fracture_x_mm + gap / 2
        step = 0.5 * p.fracture_size_mm
        far_top = top + step + 0.08 * (mx - p.fracture_x_mm)  # distal fragment displaced and angulated
        fragments.append((np.append(mx[near], p.fracture_x_mm - gap / 2), np.append(top[near], np.interp(p.fracture_x_mm - gap / 2, mx, top))))
        fx = np.insert(mx[far], 0, p.fracture_x_mm + gap / 2)
        fragments.append((fx, np.insert(far_top[far], 0, np.interp(fx[0], mx, far_top))))
    else:
        fragments.append((mx, top))
    metaphysis_end_z = float(top[-1]) if p.fracture != "break" else float(fragments[-1][1][-1])

    # Epiphysis (label 2): a dome beyond the physis, under a cartilage cap.
    epi_len = p.epi_len_mm * spec.epi_scale
    ex = np.linspace(half_gap, half_gap + epi_len, 61)
    epi_base = metaphysis_end_z + st["epi_drop_mm"]
    dome = np.sqrt(np.clip(1 - ((ex - (half_gap + epi_len / 2)) / (epi_len / 2)) ** 2, 0, 1))
    epi_top = epi_base - st["epi_height_mm"] * dome
    bones: list[tuple[np.ndarray, int]] = []

    # Carpal bones (label 3): ossification centres in a cartilage shell, distal to the joint.
    carpal_polys = []
    cx = half_gap + epi_len + p.carpal_gap_mm + p.carpal_len_mm / 2
    for k in range(spec.carpals):
        length = p.carpal_len_mm * (1.0 if k == 0 else 0.85)
        height = p.carpal_height_mm * (1.0 if k == 0 else 0.9)
        cz = epi_base + st["carpal_depth_mm"] + 0.6 * k + height
        carpal_polys.append((cx, cz, length / 2, height))
        cx += length / 2 + p.carpal_gap_mm * 0.6 + p.carpal_len_mm * 0.85 / 2

    # Cartilage (painted before bones): physis, epiphyseal cap, joint space, carpal shells.
    joint_end = carpal_polys[0][0] - carpal_polys[0][2] if carpal_polys else half_gap + epi_len + 1.0
    cart_x = np.linspace(-half_gap - 0.3, joint_end, 50)
    cap_top = np.interp(cart_x, ex, epi_top, left=metaphysis_end_z, right=epi_base) - p.cap_mm
    soft.append((_band(cart_x, cap_top, cap_top + BONE_BOTTOM_MM + 4), CARTILAGE))
    for cx_, cz_, a_, b_ in carpal_polys:
        soft.append((_ellipse(cx_, cz_, a_ + p.carpal_cartilage_mm, b_ + p.carpal_cartilage_mm), CARTILAGE))
    # Deeper bone seen through the physis and joint gaps (unlabeled: dim and in the shadow zone).
    deep_spans = [(-half_gap - 0.3, half_gap + 0.3, max(metaphysis_end_z, epi_base) + 2.5)]
    if carpal_polys:
        c0 = carpal_polys[0]
        deep_spans.append((half_gap + epi_len - 0.3, c0[0] - c0[2] + 0.3, max(epi_base, c0[1] - c0[3]) + 2.0))
    for x_lo, x_hi, z_top in deep_spans:
        dx_ = np.array([x_lo, x_hi])
        soft.append((_band(dx_, np.full(2, z_top), np.full(2, z_top + BONE_BOTTOM_MM)), BONE))
    if spec.muscle:  # pronator quadratus over the distal radius, ending before the physis
        px = np.arange(WORLD_X_MIN, -half_gap - 1.0, 1.0)
        m_top = np.interp(px, xs, top_soft + 0.1 + st["tendon_mm"] + undulation) + 0.15
        m_bot = np.interp(px, mx, top) - 0.15
        taper = _smoothstep((-px - half_gap - 1.0) / 6.0)
        m_bot = m_top + (m_bot - m_top) * (0.25 + 0.75 * taper)
        soft.append((_band(px, m_top, np.maximum(m_bot, m_top + 0.2)), MUSCLE))

    soft.extend((band, FASCIA) for band in soft_fascia)
    for fx_, ftop in fragments:
        bones.append((_bone_polygon(fx_, ftop), 1))
    bones.append((_bone_polygon(ex, epi_top), 2))
    for cx_, cz_, a_, b_ in carpal_polys:
        bones.append((_ellipse(cx_, cz_, a_, b_), 3))
    return Geometry(skin_mm=p.skin_mm, fat_mm=st["fat_mm"], cortex_mm=p.cortex_mm, soft=soft, bones=bones)


# ---------------------------------------------------------------------------------------------
# Exact column-wise rasterization


def column_intervals(poly: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Inside intervals of a closed polygon along vertical lines ``x = xs``.

    Returns (C, P, 2) [z_enter, z_exit) pairs, padded with +inf (empty). An edge counts for
    ``x`` when ``min(xa, xb) <= x < max(xa, xb)`` (half-open, so a vertex is crossed once),
    which makes the result the even-odd point-in-polygon rule at every depth.
    """
    xa, za = poly[:, 0], poly[:, 1]
    nxt = np.append(np.arange(1, len(poly)), 0)
    xb, zb = xa[nxt], za[nxt]
    lo, hi = np.minimum(xa, xb), np.maximum(xa, xb)
    keep = (hi > xs.min()) & (lo <= xs.max()) & (hi > lo)
    xa, za, xb, zb, lo, hi = xa[keep], za[keep], xb[keep], zb[keep], lo[keep], hi[keep]
    if xa.size == 0:
        return np.full((xs.size, 1, 2), np.inf)
    x = xs[:, None]
    crosses = (lo <= x) & (x < hi)
    t = (x - xa) / (xb - xa)
    z = np.where(crosses, za + t * (zb - za), np.inf)
    n = int(crosses.sum(axis=1).max())
    n += n % 2
    if n == 0:
        return np.full((xs.size, 1, 2), np.inf)
    z = np.sort(z, axis=1)[:, :n]
    return z.reshape(xs.size, n // 2, 2)


def inside_mask(poly: np.ndarray, xs: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """(R, C) bool: pixel centres (zs[r], xs[c]) inside the polygon."""
    iv = column_intervals(poly, xs)
    z = zs[:, None, None]
    return ((iv[None, :, :, 0] <= z) & (z < iv[None, :, :, 1])).any(axis=2)


@dataclass
class Painted:
    """Rasterized frame on a grid: tissue ids, bone labels (the labeled cortex band only), and
    per column the first bone surface hit by the beam (depth, +inf if none) and its slope."""

    tissue: np.ndarray
    labels: np.ndarray
    surface_z: np.ndarray
    surface_slope: np.ndarray


def bone_band(geom: Geometry, xs: np.ndarray, zs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of the cortex band (R, C) uint8, bone interior (R, C) bool, first surface depth (C,).

    Band rule: a pixel centre inside a bone is labeled when the bone path length along its
    column, from the first bone surface down to the centre, is at most ``geom.cortex_mm``.
    """
    rows, cols = zs.size, xs.size
    labels_inside = np.zeros((rows, cols), np.uint8)
    path = np.zeros((rows, cols), np.float64)
    surface = np.full(cols, np.inf)
    z = zs[:, None]
    for poly, lab in geom.bones:
        iv = column_intervals(poly, xs)
        for k in range(iv.shape[1]):
            a, b = iv[:, k, 0], iv[:, k, 1]
            hit = np.isfinite(a)
            if not hit.any():
                continue
            a_ = np.where(hit, a, np.inf)[None, :]
            length = np.where(hit, np.where(hit, b, 0.0) - np.where(hit, a, 0.0), 0.0)[None, :]
            # Bone path length above each pixel centre contributed by this interval.
            path += np.clip(z - a_, 0.0, length)
            labels_inside[(a_ <= z) & (z < np.where(hit, b, -np.inf)[None, :])] = lab
            surface = np.minimum(surface, a_[0])
    inside = labels_inside > 0
    band = inside & (path <= geom.cortex_mm)
    labels = np.where(band, labels_inside, 0).astype(np.uint8)
    return labels, inside & ~band, surface


def paint(geom: Geometry, xs: np.ndarray, zs: np.ndarray) -> Painted:
    """Rasterize a probe-coordinate geometry on the grid of pixel centres (xs, zs) in mm."""
    rows, cols = zs.size, xs.size
    tissue = np.full((rows, cols), DEEP, dtype=np.uint8)
    for poly, t in geom.soft:
        tissue[inside_mask(poly, xs, zs)] = t
    zcol = np.broadcast_to(zs[:, None], (rows, cols))
    tissue[zcol < geom.skin_mm + geom.fat_mm] = FAT
    tissue[zcol < geom.skin_mm] = SKIN
    labels, interior, surface = bone_band(geom, xs, zs)
    tissue[interior] = BONE
    tissue[labels > 0] = CORTEX
    slope = surface_slope(surface, xs)
    return Painted(tissue=tissue, labels=labels, surface_z=surface, surface_slope=slope)


def surface_slope(surface: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """dz/dx of the first bone surface per beam, from neighbouring beams that also see bone
    (one-sided at a surface's ends); 0 where no neighbour sees bone."""
    slope = np.zeros(surface.size)
    if surface.size < 2:
        return slope
    finite = np.isfinite(surface)
    dxs = np.diff(xs)
    diff = np.where(finite[1:] & finite[:-1], np.diff(np.where(finite, surface, 0.0)) / dxs, np.nan)
    fwd = np.append(diff, np.nan)
    bwd = np.insert(diff, 0, np.nan)
    both = np.stack([fwd, bwd])
    count = np.isfinite(both).sum(axis=0)
    total = np.nansum(both, axis=0)
    slope = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return np.where(finite, slope, 0.0)
