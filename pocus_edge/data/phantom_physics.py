"""Image formation of the phantom: the standard convolution model of B-mode ultrasound.

Per frame, on a simulation grid of ``nz`` depth samples by ``scan_lines`` beams:

1. **Scatterers.** Each sweep owns a fixed random field of point scatterers in world
   coordinates (x, z and elevation y; Gaussian amplitudes). The probe window moves over it,
   so speckle moves coherently with the tissue and decorrelates only through tilt (phase)
   and elevational motion (the Gaussian slice profile re-weights the scatterers).
2. **Demodulated (IQ) scatter field.** Each scatterer contributes ``a * w(y) * exp(-2j k z)``
   (``k`` = wavenumber at the probe's centre frequency) to its grid cell: this is the
   quadrature-demodulated form of an axial pulse at the centre frequency, so the carrier
   need not be sampled. The cell sums are weighted by the tissue's echogenicity and the
   two-way depth attenuation (which makes the acoustic shadow under bone), and the bone
   surface adds a coherent specular echo whose strength falls with the incidence angle.
3. **PSF.** Separable convolution with the pulse envelope (axial) and the beam profile
   (lateral, widening away from the focus); electronic noise; time-gain compensation.
4. **Envelope** ``|IQ|`` (the same as the Hilbert-transform envelope of the RF line, see
   :func:`rf_envelope`), **log compression** into the probe's dynamic range and gray map,
   **scan conversion** to the output pixel grid, post-filter, additive gray noise.

All of it is numpy/OpenCV array code; one frame costs a few milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .phantom_anatomy import (
    ATTENUATION_DB_PER_MM_MHZ,
    BONE,
    CORTEX,
    ECHOGENICITY,
    SPECULAR_REFLECTIVITY,
    TEXTURE_STRENGTH,
    Painted,
    Pose,
)
from .phantom_profiles import ProbeProfile

SPEED_OF_SOUND_MM_PER_US = 1.54
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
ELEVATION_SLAB_SIGMAS = 1.75  # scatterers farther than this from the slice centre are ignored


@dataclass(frozen=True)
class SimGrid:
    """Simulation grid in probe coordinates: cell centres ``zs`` (depth) and ``xs`` (lateral)."""

    nz: int
    nx: int
    depth_mm: float
    width_mm: float

    @property
    def dz(self) -> float:
        return self.depth_mm / self.nz

    @property
    def dx(self) -> float:
        return self.width_mm / self.nx

    @property
    def zs(self) -> np.ndarray:
        return (np.arange(self.nz) + 0.5) * self.dz

    @property
    def xs(self) -> np.ndarray:
        return (np.arange(self.nx) + 0.5) * self.dx - self.width_mm / 2


def panel_grid(profile: ProbeProfile, scale: float) -> SimGrid:
    """The output B-mode panel's pixel grid (pixel pitch ``pixel_mm / scale``)."""
    g = profile.geometry
    pitch = g.pixel_mm / scale
    return SimGrid(nz=max(8, round(g.depth_mm / pitch)), nx=max(8, round(g.width_mm / pitch)), depth_mm=g.depth_mm, width_mm=g.width_mm)


def sim_grid(profile: ProbeProfile, scale: float, oversample: int) -> SimGrid:
    """Beamforming grid: ``oversample`` depth samples per output pixel, ``scan_lines * scale`` beams."""
    g = profile.geometry
    panel = panel_grid(profile, scale)
    return SimGrid(nz=panel.nz * max(1, int(oversample)), nx=max(8, round(g.scan_lines * scale)), depth_mm=g.depth_mm, width_mm=g.width_mm)


def wavenumber2(profile: ProbeProfile) -> float:
    """Two-way wavenumber 2k (rad/mm) at the centre frequency."""
    return 4.0 * math.pi * profile.psf.center_mhz / SPEED_OF_SOUND_MM_PER_US


def scatterers_per_cell(profile: ProbeProfile, grid: SimGrid) -> float:
    """Mean scatterer count per cell (elevation-weighted) giving the profile's count per
    resolution cell; at least ``scatterers_per_resolution_cell / 4`` when the PSF is
    smaller than four cells (coarse grids such as the tiny preset's)."""
    p = profile.psf
    res_cells = (p.axial_fwhm_mm * p.lateral_fwhm_mm) / (grid.dz * grid.dx)
    return profile.acquisition.scatterers_per_resolution_cell / max(res_cells, 4.0)


class Scatterers:
    """A sweep's fixed scatterer field (world mm), sorted by elevation for fast slicing."""

    def __init__(self, x: np.ndarray, z: np.ndarray, y: np.ndarray, amp: np.ndarray, per_cell: float, sigma_e: float):
        # x, z, amp are drawn independently of y, so sorting y alone keeps the joint law.
        self.x, self.z, self.y, self.amp = x, z, np.sort(y), amp
        self.per_cell = per_cell
        self.sigma_e = sigma_e

    @classmethod
    def generate(
        cls,
        profile: ProbeProfile,
        grid: SimGrid,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        rng: np.random.Generator,
    ) -> "Scatterers":
        sigma_e = profile.psf.elevation_fwhm_mm / FWHM_PER_SIGMA
        per_cell = scatterers_per_cell(profile, grid)
        # Density such that the expected sum of squared slice weights per cell is ``per_cell``.
        density = per_cell / (grid.dz * grid.dx * sigma_e * math.sqrt(math.pi))
        z_lo, z_hi = -1.5, grid.depth_mm + 1.5 + 0.08 * grid.width_mm
        y_lo, y_hi = y_range[0] - ELEVATION_SLAB_SIGMAS * sigma_e, y_range[1] + ELEVATION_SLAB_SIGMAS * sigma_e
        volume = (x_range[1] - x_range[0]) * (z_hi - z_lo) * (y_hi - y_lo)
        n = int(rng.poisson(density * volume))
        x = rng.uniform(x_range[0], x_range[1], n).astype(np.float32)
        z = rng.uniform(z_lo, z_hi, n).astype(np.float32)
        y = rng.uniform(y_lo, y_hi, n).astype(np.float32)
        # Unit reflectors (random sign): the sum converges to Gaussian speckle faster than
        # Gaussian amplitudes do, for the same scatterer count.
        amp = np.where(rng.random(n, dtype=np.float32) < 0.5, np.float32(-1.0), np.float32(1.0))
        return cls(x, z, y, amp, per_cell, sigma_e)

    def field(self, pose: Pose, grid: SimGrid, k2: float) -> np.ndarray:
        """Demodulated scatter field (nz, nx) complex64; unit mean power per cell."""
        half = ELEVATION_SLAB_SIGMAS * self.sigma_e
        lo, hi = np.searchsorted(self.y, np.array([pose.y - half, pose.y + half], dtype=self.y.dtype))
        xw, zw, yw, a = self.x[lo:hi], self.z[lo:hi], self.y[lo:hi], self.amp[lo:hi]
        f32 = np.float32
        c, s = f32(math.cos(pose.theta)), f32(math.sin(pose.theta))
        dxw = xw - f32(pose.x0)
        fx = (c * dxw + s * zw + f32(grid.width_mm / 2)) * f32(1.0 / grid.dx)
        zp = c * zw - s * dxw
        fz = zp * f32(1.0 / grid.dz)
        ok = (fx >= 0) & (fx < grid.nx) & (fz >= 0) & (fz < grid.nz)
        size = grid.nz * grid.nx
        # Out-of-window scatterers go to one spare bin (cheaper than compressing every array).
        flat = np.where(ok, fz.astype(np.int64) * grid.nx + fx.astype(np.int64), size)
        dy = (yw - f32(pose.y)) * f32(1.0 / self.sigma_e)
        w = a * np.exp(f32(-0.5) * dy * dy)
        phase = f32(k2) * zp
        # bincount works in float64: convert once here rather than inside it (much faster).
        re = np.bincount(flat, weights=(w * np.cos(phase)).astype(np.float64), minlength=size + 1)[:size]
        im = np.bincount(flat, weights=(w * -np.sin(phase)).astype(np.float64), minlength=size + 1)[:size]
        re *= 1.0 / math.sqrt(self.per_cell)
        im *= 1.0 / math.sqrt(self.per_cell)
        return (re + 1j * im).astype(np.complex64).reshape(grid.nz, grid.nx)


class Texture:
    """Tissue-fixed echogenicity texture (unit-variance, elongated along the forearm: tendon
    fibrils, muscle striations, fat septa), sampled through the probe pose every frame."""

    def __init__(self, x_range: tuple[float, float], depth_mm: float, rng: np.random.Generator, res_mm: float = 0.1):
        import cv2

        self.res = res_mm
        self.x0 = x_range[0]
        self.z0 = -2.0
        w = int(math.ceil((x_range[1] - x_range[0]) / res_mm)) + 2
        h = int(math.ceil((depth_mm + 6.0) / res_mm)) + 2
        noise = rng.standard_normal((h, w)).astype(np.float32)
        tex = cv2.GaussianBlur(noise, (0, 0), sigmaX=1.0 / res_mm, sigmaY=0.12 / res_mm, borderType=cv2.BORDER_REFLECT)
        tex -= tex.mean()
        self.map = tex / max(float(tex.std()), 1e-6)

    def sample(self, pose: Pose, grid: SimGrid) -> np.ndarray:
        import cv2

        # grid pixel -> probe mm -> world mm -> texture pixel, as one affine map (dst -> src).
        to_probe = np.array([[grid.dx, 0, 0.5 * grid.dx - grid.width_mm / 2], [0, grid.dz, 0.5 * grid.dz], [0, 0, 1]])
        to_world = np.vstack([pose.probe_to_world_matrix(), [0, 0, 1]])
        to_tex = np.array([[1 / self.res, 0, -self.x0 / self.res - 0.5], [0, 1 / self.res, -self.z0 / self.res - 0.5], [0, 0, 1]])
        m = (to_tex @ to_world @ to_probe)[:2].astype(np.float64)
        return cv2.warpAffine(
            self.map, m, (grid.nx, grid.nz), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
        )


def _gauss_kernel(sigma_cells: float) -> np.ndarray:
    """Unit-energy Gaussian kernel (sum of squares 1), so speckle keeps unit mean power."""
    if sigma_cells < 0.25:
        return np.ones(1, np.float32)
    half = max(1, int(math.ceil(3.0 * sigma_cells)))
    t = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma_cells) ** 2)
    return (k / math.sqrt((k * k).sum())).astype(np.float32)


def _filter(stack: np.ndarray, kx: np.ndarray, kz: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.sepFilter2D(stack, cv2.CV_32F, kx, kz, borderType=cv2.BORDER_CONSTANT)


def beamform_iq(
    profile: ProbeProfile,
    grid: SimGrid,
    field: np.ndarray,
    painted: Painted,
    *,
    texture: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    attenuation: bool = True,
    specular: bool = True,
) -> np.ndarray:
    """Demodulated echo signal (nz, nx) complex64 after PSF, noise (if ``rng``) and TGC."""
    psf, acq = profile.psf, profile.acquisition
    tissue = painted.tissue
    echo_table = ECHOGENICITY.copy()
    # Bone backscatter relative to soft tissue is frequency dependent: a per-probe knob.
    echo_table[[BONE, CORTEX]] *= np.float32(10.0 ** (acq.bone_echo_db / 10.0))
    echo = echo_table[tissue]
    if texture is not None:
        strength = TEXTURE_STRENGTH[tissue]
        echo = echo * np.exp(strength * texture - 0.5 * strength * strength)
    amp = np.sqrt(echo).astype(np.float32)
    loss_db = np.zeros_like(amp)
    if attenuation:
        per_cell = ATTENUATION_DB_PER_MM_MHZ[tissue] * np.float32(psf.center_mhz * grid.dz)
        # Two-way loss down to each cell's centre.
        loss_db = 2.0 * (np.cumsum(per_cell, axis=0) - 0.5 * per_cell)
        amp *= np.power(np.float32(10.0), -loss_db / np.float32(20.0))
    sig = field * amp
    if specular:
        cols = np.flatnonzero(np.isfinite(painted.surface_z) & (painted.surface_z < grid.depth_mm))
        if cols.size:
            zsurf = painted.surface_z[cols]
            rows = np.clip(np.floor(zsurf / grid.dz).astype(np.int64), 0, grid.nz - 1)
            cos_inc = 1.0 / np.sqrt(1.0 + painted.surface_slope[cols] ** 2)
            # sqrt(dx/dz) keeps the line's strength independent of the grid (a line reflector
            # against area-density speckle).
            a = SPECULAR_REFLECTIVITY * acq.specular_gain * math.sqrt(grid.dx / grid.dz) * cos_inc ** acq.specular_angle_power
            a = a * 10.0 ** (-loss_db[rows, cols] / 20.0)
            sig[rows, cols] += (a * np.exp(-1j * wavenumber2(profile) * zsurf)).astype(np.complex64)
    stack = np.dstack([sig.real, sig.imag]).astype(np.float32)
    # Lateral beam profile: narrowest at the focus, widening linearly with distance from it;
    # realised by blending the images filtered with the narrowest and widest beams per depth.
    sigma_l = psf.lateral_fwhm_mm / FWHM_PER_SIGMA / grid.dx
    one = np.ones(1, np.float32)
    near = _filter(stack, _gauss_kernel(sigma_l), one)
    zs = grid.zs.astype(np.float32)
    far_mm = float(np.max(np.abs(zs - psf.focus_mm)))
    growth = psf.lateral_growth_per_cm * far_mm / 10.0
    if growth > 1e-3:
        wide = _filter(stack, _gauss_kernel(sigma_l * (1.0 + growth)), one)
        wgt = (np.abs(zs - psf.focus_mm) / far_mm)[:, None, None]
        stack = near * (1.0 - wgt) + wide * wgt
    else:
        stack = near
    if rng is not None:
        sigma_n = 10.0 ** (acq.noise_db / 20.0) / math.sqrt(2.0)
        stack = stack + (sigma_n * rng.standard_normal(stack.shape)).astype(np.float32)
    sigma_a = psf.axial_fwhm_mm / FWHM_PER_SIGMA / grid.dz
    stack = _filter(stack, one, _gauss_kernel(sigma_a))
    tgc = np.power(np.float32(10.0), np.float32(acq.tgc_db_per_cm / 200.0) * zs)[:, None, None]
    stack *= tgc
    return (stack[..., 0] + 1j * stack[..., 1]).astype(np.complex64)


def envelope(iq: np.ndarray) -> np.ndarray:
    """Envelope detection of the demodulated signal: its magnitude."""
    return np.abs(iq).astype(np.float32)


def rf_envelope(rf: np.ndarray, axis: int = 0) -> np.ndarray:
    """Envelope of real RF lines by the Hilbert transform (reference path to :func:`envelope`)."""
    from scipy.signal import hilbert

    return np.abs(hilbert(rf, axis=axis))


def log_compress(env: np.ndarray, profile: ProbeProfile) -> np.ndarray:
    """Envelope -> gray levels (float32, 0..255): gain, dynamic range, gray map."""
    d = profile.display
    db = 20.0 * np.log10(np.maximum(env, 1e-9)) + d.gain_db
    t = np.clip((db + d.dynamic_range_db) / d.dynamic_range_db, 0.0, 1.0)
    if d.gamma != 1.0:
        t = t ** np.float32(d.gamma)
    return (d.black_level + (d.white_level - d.black_level) * t).astype(np.float32)


def scan_convert(gray: np.ndarray, panel: SimGrid) -> np.ndarray:
    """Simulation grid -> output panel: area-average in depth, linear interpolation across beams."""
    import cv2

    g = cv2.resize(gray, (gray.shape[1], panel.nz), interpolation=cv2.INTER_AREA)
    return cv2.resize(g, (panel.nx, panel.nz), interpolation=cv2.INTER_LINEAR)


def finish_panel(gray: np.ndarray, profile: ProbeProfile, scale: float, rng: np.random.Generator | None) -> np.ndarray:
    """Post-filter, additive gray noise, quantization to uint8."""
    import cv2

    d = profile.display
    if d.smoothing_px > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), sigmaX=d.smoothing_px * scale)
    if rng is not None and d.gray_noise > 0:
        gray = gray + (d.gray_noise * rng.standard_normal(gray.shape)).astype(np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def margins(profile: ProbeProfile, scale: float) -> tuple[int, int, int, int]:
    g = profile.geometry
    return tuple(int(round(m * scale)) for m in (g.margin_top_px, g.margin_bottom_px, g.margin_left_px, g.margin_right_px))  # type: ignore[return-value]


def compose_frame(panel: np.ndarray, mask: np.ndarray, profile: ProbeProfile, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Place the B-mode panel (and its mask) inside the probe's screen layout (border, ruler)."""
    g = profile.geometry
    top, bottom, left, right = margins(profile, scale)
    h, w = panel.shape
    frame = np.full((h + top + bottom, w + left + right), g.border_level, np.uint8)
    frame[top : top + h, left : left + w] = panel
    full_mask = np.zeros(frame.shape, np.uint8)
    full_mask[top : top + h, left : left + w] = mask
    if g.depth_ticks and right >= 3:
        pitch = g.depth_mm / h
        tick_len = max(2, right // 3)
        for depth in np.arange(5.0, g.depth_mm, 5.0):
            r = top + int(round(depth / pitch))
            frame[r : r + max(1, round(scale)), left + w + 1 : left + w + 1 + tick_len] = 200
    return frame, full_mask


# ---------------------------------------------------------------------------------------------
# Image-quality figures (tests and the domain-gap benchmark)


def bone_edge_metrics(image: np.ndarray, mask: np.ndarray, pixel_mm: float, *, window_mm: float = 1.2) -> dict[str, float]:
    """Edge sharpness and contrast of the labeled bone surface in one frame.

    For every column with bone, the intensity profile across the first labeled pixel is taken
    from ``window_mm`` above to ``window_mm`` below; the profiles are averaged. ``sharpness``
    is the steepest rise of the mean profile divided by its full rise (1/mm: the inverse edge
    width, independent of gray scale). ``cnr`` is (mean bone - mean tissue above) / std of
    the tissue above, the tissue being 0.4 to 2.0 mm above the surface. NaN without bone.
    """
    img = image.astype(np.float64)
    labeled = mask > 0
    cols = np.flatnonzero(labeled.any(axis=0))
    k = int(round(window_mm / pixel_mm))
    lo_t, hi_t = int(round(0.4 / pixel_mm)), max(int(round(2.0 / pixel_mm)), int(round(0.4 / pixel_mm)) + 2)
    profiles, bone_vals, tissue_vals = [], [], []
    for c in cols:
        r0 = int(np.argmax(labeled[:, c]))
        if r0 - max(k, hi_t) < 0 or r0 + k >= img.shape[0]:
            continue
        profiles.append(img[r0 - k : r0 + k + 1, c])
        bone_vals.append(img[labeled[:, c], c])
        above = img[r0 - hi_t : r0 - lo_t, c]
        tissue_vals.append(above[~labeled[r0 - hi_t : r0 - lo_t, c]])
    if len(profiles) < 3:
        return {"sharpness": float("nan"), "cnr": float("nan"), "columns": len(profiles)}
    mean_profile = np.mean(profiles, axis=0)
    rise = float(mean_profile.max() - mean_profile[: k + 1].min())
    slope = float(np.max(np.diff(mean_profile))) / pixel_mm
    tissue = np.concatenate(tissue_vals)
    bone = np.concatenate(bone_vals)
    return {
        "sharpness": slope / rise if rise > 0 else float("nan"),
        "cnr": float((bone.mean() - tissue.mean()) / max(tissue.std(), 1e-6)),
        "columns": len(profiles),
    }
