"""The bundled two-probe pediatric wrist POCUS simulator (the project's default data).

``simulate(out, preset="demo", seed=0)`` writes ``out/source`` (Lumify-like probe, every
frame labeled) and ``out/target`` (TeleMED-like probe, ~12.5% of frames labeled) in the
site layout of :mod:`pocus_edge.data.layout`, with the paper's patient splits assigned by
:func:`pocus_edge.data.splits.assign_splits`. The two sites hold *different* simulated
patients (as the paper's two cohorts do) drawn from the same anatomical model; what differs
between them is the image formation (probe profiles, ``data/profiles/*.yaml``).

Anatomy (:mod:`.phantom_anatomy`): a longitudinal view of the pediatric distal radius:
skin, subcutaneous fat, extensor/flexor tendons, pronator quadratus (volar views), the
metaphysis with its flare and bright cortex, the cartilaginous growth plate gap, the
epiphysis under its cartilage cap, carpal ossification centres in cartilage; per patient an
optional buckle (torus) or cortical break fracture of the distal metaphysis. Five views for
the source (dorsal, proximal dorsal, radial, volar, proximal volar), four for the target
(no radial view). Patients vary in size, soft-tissue depth and maturity.

Image formation (:mod:`.phantom_physics`): scatterers weighted by echogenicity, two-way
attenuation (acoustic shadow under bone), specular bone echo, separable PSF (pulse envelope
x beam profile), electronic noise, TGC, envelope, log compression, scan conversion, noise.

Sweeps: every video is a cine sweep in which the probe moves smoothly (out of plane, with a
small in-plane slide and tilt) over a fixed scatterer field, so neighbouring frames are
strongly correlated. ``framenum`` counts frames of the underlying cine loop; the preset
keeps every ``frame_stride``-th one.

**Masks (labeling policy).** ``Masks/<file>.png`` is a uint8 label map: 0 background,
1 metaphysis, 2 epiphysis, 3 carpal bone. As a sonographer traces wrist POCUS, the label
is the *visible* bone: for each beam (image column), the bone within ``cortex_mm`` (1.0-1.5
mm per patient) of bone path below the first bone surface the beam meets, i.e. the bright
cortical band; the shadowed bone beneath it is not labeled, nor is cartilage. The image's
cortex is drawn from the same geometry by the same rule, so masks are exact (pixel centres
inside the band, see :func:`pocus_edge.data.phantom_anatomy.bone_band`). Target frames
are labeled at the paper's rate (every 8th frame of each patient, phase shifted per
patient); unlabeled frames have no mask file. The number of target test patients and whether
all their frames are labeled are preset knobs (``target_test_patients``,
``label_all_target_test``; the ``study`` preset: 12 patients, all frames), so an evaluation can
have the power of whole sweeps without changing the training data's labeling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_path
from .layout import MANIFEST, FrameRecord, Site, SiteWriter, load_site
from .phantom_anatomy import (
    SOURCE_VIEWS,
    TARGET_VIEWS,
    Patient,
    SweepPlan,
    bone_band,
    paint,
    plan_sweep,
    sample_patient,
)
from .phantom_physics import (
    Scatterers,
    Texture,
    beamform_iq,
    compose_frame,
    envelope,
    finish_panel,
    log_compress,
    panel_grid,
    scan_convert,
    sim_grid,
    wavenumber2,
)
from .phantom_profiles import ProbeProfile, load_profile


@dataclass(frozen=True)
class SimPreset:
    """Size of a simulated data set (both sites)."""

    name: str
    patients: int  # per site
    frames_per_video: int
    frame_stride: int  # cine frames between kept frames (framenum step)
    scale: float  # output pixel pitch = profile pixel_mm / scale
    oversample: int  # simulated depth samples per output pixel
    sweep_step_mm: float  # elevational probe motion between kept frames
    target_label_every: int = 8  # the paper labels 12.5% of target frames
    # Target test patients: None = the paper's share (12.5 % of patients); a number sets it.
    target_test_patients: int | None = None
    # True: every frame of the target test patients is labeled (a test set with the statistical
    # power of whole sweeps); False: they are labeled at the sparse rate like everyone else.
    label_all_target_test: bool = False

    def split_options(self, domain: str) -> dict:
        """Keyword options of :func:`pocus_edge.data.splits.assign_splits` for this preset."""
        if domain != "target" or self.target_test_patients is None:
            return {}
        if not 1 <= self.target_test_patients < self.patients:
            raise ConfigError(
                f"target test patients must be in 1..{self.patients - 1} for {self.patients} patients, "
                f"got {self.target_test_patients}"
            )
        # assign_splits rounds patients x fraction to the nearest integer: this gives exactly N.
        return {"target_test_fraction": self.target_test_patients / self.patients}


PRESETS = {
    # Tests: every split gets a patient (6 patients -> source 4/1/1, target test 1, ub 4/1).
    "tiny": SimPreset("tiny", patients=6, frames_per_video=8, frame_stride=2, scale=0.45, oversample=1, sweep_step_mm=0.3),
    # The CPU demo: ~700 source / ~580 target frames of ~200 x 230 px; its 3 target test patients
    # are labeled on every frame (72 frames instead of 9), so the report can show its uncertainty.
    "demo": SimPreset("demo", patients=24, frames_per_video=6, frame_stride=4, scale=1.0, oversample=2, sweep_step_mm=0.35,
                      label_all_target_test=True),
    # The Table 3 analog benchmark: a few thousand frames per domain.
    "bench": SimPreset("bench", patients=44, frames_per_video=16, frame_stride=2, scale=1.0, oversample=2, sweep_step_mm=0.25),
    # `pocus-edge study`: bench-sized sweeps, 12 target test patients with every frame labeled
    # (768 test frames), 38 target patients left for pretraining as in `bench`.
    "study": SimPreset("study", patients=50, frames_per_video=16, frame_stride=2, scale=1.0, oversample=2,
                       sweep_step_mm=0.25, target_test_patients=12, label_all_target_test=True),
}


def with_target_test(preset: str | SimPreset, patients: int | None = None, label_all: bool | None = None) -> SimPreset:
    """A preset with its target test changed: ``patients`` test patients and/or every frame of
    them labeled (None keeps the preset's setting)."""
    import dataclasses

    p = get_preset(preset)
    changes = {}
    if patients is not None:
        changes["target_test_patients"] = int(patients)
    if label_all is not None:
        changes["label_all_target_test"] = bool(label_all)
    if not changes:
        return p
    out = dataclasses.replace(p, **changes)
    out.split_options("target")  # refuse an impossible count before anything is rendered
    return out

SOURCE_PROFILE = "lumify"
TARGET_PROFILE = "telemed"


def get_preset(preset: str | SimPreset) -> SimPreset:
    if isinstance(preset, SimPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown simulator preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


SITE_KEYS = {"source": 1, "target": 2}


def site_patients(domain: str, preset: SimPreset, seed: int) -> list[Patient]:
    return [sample_patient(_patient_id(domain, i), _rng(seed, SITE_KEYS[domain], i, 0)) for i in range(preset.patients)]


def render_sweep(
    profile: ProbeProfile,
    plan: SweepPlan,
    *,
    scale: float = 1.0,
    oversample: int = 2,
    seed: int = 0,
    noise: bool = True,
    texture: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (frame uint8, label map uint8) for every frame of a sweep plan with one probe.

    The plan fixes the anatomy and probe path; ``seed`` fixes the scatterers and noise, so
    rendering one plan with two profiles gives the same anatomy through two probes.
    """
    rng = _rng(seed)
    grid = sim_grid(profile, scale, oversample)
    panel = panel_grid(profile, scale)
    k2 = wavenumber2(profile)
    x_range = plan.x_range(grid.width_mm / 2, grid.depth_mm)
    scat = Scatterers.generate(profile, grid, x_range, (0.0, plan.sweep_length_mm), rng)
    tex = Texture(x_range, grid.depth_mm, rng, res_mm=max(0.1, 0.5 * grid.dz)) if texture else None
    for i in range(plan.n_frames):
        pose = plan.pose(i)
        geom = plan.geometry(i).transformed(pose)
        painted = paint(geom, grid.xs, grid.zs)
        field = scat.field(pose, grid, k2)
        iq = beamform_iq(
            profile, grid, field, painted, texture=tex.sample(pose, grid) if tex else None, rng=rng if noise else None
        )
        gray = scan_convert(log_compress(envelope(iq), profile), panel)
        image = finish_panel(gray, profile, scale, rng if noise else None)
        mask = bone_band(geom, panel.xs, panel.zs)[0]
        yield compose_frame(image, mask, profile, scale)


def _patient_id(domain: str, index: int) -> str:
    return f"{'S' if domain == 'source' else 'T'}{index + 1:03d}"


def planned_records(domain: str, preset: str | SimPreset = "demo", seed: int = 0) -> list[FrameRecord]:
    """The manifest rows a simulated site will have (no splits yet), without rendering. With
    ``label_all_target_test`` every frame of the target test patients (as the seed's splits will
    draw them) is labeled."""
    if domain not in SITE_KEYS:
        raise ConfigError(f"unknown domain {domain!r}; choose source or target")
    p = get_preset(preset)
    views = SOURCE_VIEWS if domain == "source" else TARGET_VIEWS
    records = []
    for pi in range(p.patients):
        pid = _patient_id(domain, pi)
        frame_in_patient = 0
        for view in views:
            video = f"{pid}_{view}"
            for i in range(p.frames_per_video):
                framenum = i * p.frame_stride
                # Target: every k-th frame of each patient, phase shifted per patient, so the
                # labeled frames are spread over all patients and views.
                labeled = domain == "source" or (frame_in_patient + pi) % p.target_label_every == 0
                frame_in_patient += 1
                records.append(
                    FrameRecord(
                        filename=f"{video}_{framenum:04d}.png", videoname=video, framenum=framenum,
                        patient=pid, view=view, labeled=labeled,
                    )
                )
    if domain == "target" and p.label_all_target_test:
        records = _label_test_patients(records, p, seed)
    return records


def _label_test_patients(records: list[FrameRecord], preset: SimPreset, seed: int) -> list[FrameRecord]:
    """Mark every frame of the target test patients labeled. Every patient already has sparse
    labels, so the splits drawn afterwards pick the same test patients."""
    import dataclasses

    from .splits import assign_splits

    split = assign_splits(records, domain="target", seed=seed, **preset.split_options("target"))
    test_patients = {r.patient for r in split if r.split == "test"}
    return [dataclasses.replace(r, labeled=True) if r.patient in test_patients else r for r in records]


def iter_site_frames(
    domain: str,
    *,
    preset: str | SimPreset = "demo",
    seed: int = 0,
    profile: str | Path | ProbeProfile | None = None,
    patients: Sequence[int] | None = None,
) -> Iterator[tuple[FrameRecord, np.ndarray, np.ndarray]]:
    """Yield ``(record, frame, label map)`` for every frame of a simulated site, in manifest
    order (``record.labeled`` says whether the mask is written). Every patient and video has
    its own seed, so ``patients`` (indices) renders a subset with identical pixels."""
    p = get_preset(preset)
    records = iter(planned_records(domain, p, seed))
    prof = load_profile(profile or (SOURCE_PROFILE if domain == "source" else TARGET_PROFILE))
    views = SOURCE_VIEWS if domain == "source" else TARGET_VIEWS
    key = SITE_KEYS[domain]
    wanted = set(range(p.patients)) if patients is None else set(patients)
    for pi, patient in enumerate(site_patients(domain, p, seed)):
        for vi, view in enumerate(views):
            video_records = [next(records) for _ in range(p.frames_per_video)]
            if pi not in wanted:
                continue
            plan = plan_sweep(patient, view, p.frames_per_video, _rng(seed, key, pi, 1, vi), sweep_step_mm=p.sweep_step_mm)
            render_seed = int(_rng(seed, key, pi, 2, vi).integers(2**63))
            frames = render_sweep(prof, plan, scale=p.scale, oversample=p.oversample, seed=render_seed)
            for rec, (image, mask) in zip(video_records, frames):
                yield rec, image, mask


def _check_site_dir(root: Path, overwrite: bool) -> None:
    """Refuse, before rendering anything, a ``root`` that holds a site (unless ``overwrite``) or
    anything else: a simulated site replaces only an earlier site, never a folder of other files."""
    if (root / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{root}: already holds a site (manifest.csv exists); pass --overwrite to replace it")
    elif root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise DataError(f"{root}: folder exists and is not empty; pass --overwrite or choose another OUT")
        raise DataError(f"{root}: folder exists, is not empty and is not a site; refusing to replace it (choose another OUT)")


def _is_site(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _site_staging(root: Path):
    """A staging folder beside ``root``, renamed to ``root`` (replacing an earlier site) only when
    the block completes; removed otherwise, so a failed or interrupted run leaves nothing there."""
    return atomic_path(root, suffix=".simulating", kind="dir", replaces=_is_site)


def _write_site(folder: Path, domain: str, preset: SimPreset, seed: int, profile: ProbeProfile, workers: int,
                on_frame=None) -> None:
    """Render one site's frames into ``folder`` and write its manifest (with splits) last."""
    from .splits import assign_splits

    writer = SiteWriter(folder, fsync_frames=False)
    for rec, image, mask in _site_frames(domain, preset, seed, profile, workers):
        writer.add(rec, image, mask if rec.labeled else None)
        if on_frame is not None:
            on_frame()
    writer.records = assign_splits(writer.records, domain=domain, seed=seed, **preset.split_options(domain))
    writer.write_manifest()


def simulate_site(
    root: str | Path,
    *,
    domain: str,
    preset: str | SimPreset = "demo",
    seed: int = 0,
    profile: str | Path | ProbeProfile | None = None,
    overwrite: bool = False,
    on_frame=None,
    workers: int = 1,
) -> Site:
    """Write one simulated site (``domain`` = source | target) and assign its splits. The site is
    built in a staging folder beside ``root`` and renamed into place when complete.

    ``workers`` > 1 renders patients in that many processes; the files are identical."""
    from .splits import assign_splits

    if domain not in SITE_KEYS:
        raise ConfigError(f"unknown domain {domain!r}; choose source or target")
    p = get_preset(preset)
    prof = load_profile(profile or (SOURCE_PROFILE if domain == "source" else TARGET_PROFILE))
    root = Path(root)
    # Fail on a preset too small for the paper's splits before rendering anything.
    assign_splits(planned_records(domain, p, seed), domain=domain, seed=seed, **p.split_options(domain))
    _check_site_dir(root, overwrite)
    with _site_staging(root) as staged:
        _write_site(staged, domain, p, seed, prof, workers, on_frame)
    return load_site(root)


def _render_patient(args) -> list[tuple[FrameRecord, np.ndarray, np.ndarray]]:
    domain, preset, seed, profile, index = args
    return list(iter_site_frames(domain, preset=preset, seed=seed, profile=profile, patients=[index]))


def _site_frames(
    domain: str, preset: SimPreset, seed: int, profile: ProbeProfile, workers: int
) -> Iterator[tuple[FrameRecord, np.ndarray, np.ndarray]]:
    """Frames in manifest order, rendered here or by ``workers`` processes (one patient per task;
    every patient has its own seeds, so the pixels do not depend on the split of the work)."""
    if workers <= 1:
        yield from iter_site_frames(domain, preset=preset, seed=seed, profile=profile)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold threads (torch, OpenMP) that fork would copy badly.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [(domain, preset, seed, profile, i) for i in range(preset.patients)]
        for frames in pool.map(_render_patient, jobs):
            yield from frames


def frames_per_site(preset: str | SimPreset) -> dict[str, int]:
    p = get_preset(preset)
    return {
        "source": p.patients * len(SOURCE_VIEWS) * p.frames_per_video,
        "target": p.patients * len(TARGET_VIEWS) * p.frames_per_video,
    }


def simulate(
    out: str | Path,
    *,
    preset: str | SimPreset = "demo",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    source_profile: str | Path | ProbeProfile = SOURCE_PROFILE,
    target_profile: str | Path | ProbeProfile = TARGET_PROFILE,
    workers: int = 1,
    target_test_patients: int | None = None,
    label_all_target_test: bool | None = None,
    shift_severity: float | None = None,
) -> tuple[Site, Site]:
    """Write ``out/source`` and ``out/target``; returns the two loaded sites. ``workers`` > 1
    renders in that many processes (same files, faster on an idle multi-core machine).
    ``target_test_patients`` / ``label_all_target_test`` change the preset's target test (None
    keeps it). ``shift_severity`` in [0, 1] renders the target with the profile that far from the
    source profile to the target profile (:func:`.phantom_profiles.interpolate_profiles`; None =
    the target profile itself, as 1)."""
    p = with_target_test(preset, target_test_patients, label_all_target_test)
    # Validate both profiles before writing anything.
    profiles = {"source": load_profile(source_profile), "target": load_profile(target_profile)}
    if shift_severity is not None:
        from .phantom_profiles import interpolate_profiles

        profiles["target"] = interpolate_profiles(profiles["source"], profiles["target"], shift_severity)
    out = Path(out)
    counts = frames_per_site(p)
    from .splits import assign_splits

    for domain in ("source", "target"):
        assign_splits(planned_records(domain, p, seed), domain=domain, seed=seed, **p.split_options(domain))  # too few patients?
        _check_site_dir(out / domain, overwrite)
    # Both sites are built in staging folders and renamed into place together once both are
    # complete: a failure (a full disk) or an interrupt leaves neither under its name.
    with contextlib.ExitStack() as stack:
        staged = {domain: stack.enter_context(_site_staging(out / domain)) for domain in ("source", "target")}
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
            ) as bar:
                for domain in ("source", "target"):
                    task = bar.add_task(f"{domain} ({profiles[domain].name})", total=counts[domain])
                    _write_site(staged[domain], domain, p, seed, profiles[domain], workers, on_frame=lambda t=task: bar.advance(t))
        else:
            for domain in ("source", "target"):
                _write_site(staged[domain], domain, p, seed, profiles[domain], workers)
    return load_site(out / "source"), load_site(out / "target")


# ---------------------------------------------------------------------------------------------
# Montage


LABEL_COLORS = {1: "#ff4d4d", 2: "#4dd2ff", 3: "#ffd11a"}


def _montage_records(site: Site, n: int) -> list[FrameRecord]:
    """Up to ``n`` labeled frames: different views first, each from another patient."""
    labeled = [r for r in site.records if r.labeled]
    if not labeled:
        raise DataError(f"{site.root}: no labeled frames to show")
    by_view: dict[str, list[FrameRecord]] = {}
    for r in labeled:
        by_view.setdefault(r.view, []).append(r)
    picked: list[FrameRecord] = []
    used_patients: set[str] = set()
    rounds = 0
    while len(picked) < min(n, len(labeled)) and rounds < len(labeled):
        for view in sorted(by_view):
            pool = [r for r in by_view[view] if r not in picked]
            fresh = [r for r in pool if r.patient not in used_patients] or pool
            if fresh and len(picked) < n:
                choice = fresh[len(fresh) // 2]
                picked.append(choice)
                used_patients.add(choice.patient)
        rounds += 1
    return picked


def write_montage(source_dir: str | Path, target_dir: str | Path, out_png: str | Path, n: int = 4) -> Path:
    """A PNG with ``n`` labeled source frames (top row) and ``n`` target frames (bottom row),
    label contours overlaid, so the two probes can be compared side by side."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes_atomic

    if n < 1:
        raise ConfigError(f"montage needs n >= 1, got {n}")
    sites = [load_site(source_dir), load_site(target_dir)]
    rows = [_montage_records(s, n) for s in sites]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 5.0), squeeze=False)
    for row, (site, recs) in enumerate(zip(sites, rows)):
        for col in range(cols):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(recs):
                continue
            rec = recs[col]
            img, mask = site.read_image(rec), site.read_mask(rec)
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            for lab, color in LABEL_COLORS.items():
                if (mask == lab).any():
                    ax.contour((mask == lab).astype(float), levels=[0.5], colors=color, linewidths=0.7)
            ax.set_title(f"{site.name}: {rec.view}", fontsize=7)
    fig.suptitle(
        "pocus-edge simulator: source (Lumify-like, top) vs target (TeleMED-like, bottom); "
        "label contours: red metaphysis, blue epiphysis, yellow carpal",
        fontsize=8,
    )
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return write_bytes_atomic(out_png, buf.getvalue())
