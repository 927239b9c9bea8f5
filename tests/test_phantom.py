"""The simulator: speckle statistics, shadowing, the probe domain gap, exact masks, sweep
coherence, determinism, and the paper's label policy and split rules."""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pocus_edge.data.layout import load_site, read_gray_png
from pocus_edge.data.phantom import (
    PRESETS,
    iter_site_frames,
    render_sweep,
    simulate_site,
    write_montage,
)
from pocus_edge.data.phantom_anatomy import (
    DEEP,
    SOURCE_VIEWS,
    TARGET_VIEWS,
    Geometry,
    Painted,
    Pose,
    bone_band,
    plan_sweep,
    sample_patient,
)
from pocus_edge.data.phantom_physics import (
    Scatterers,
    SimGrid,
    _gauss_kernel,
    beamform_iq,
    bone_edge_metrics,
    envelope,
    panel_grid,
    rf_envelope,
    wavenumber2,
)
from pocus_edge.data.phantom_profiles import load_profile
from pocus_edge.errors import ConfigError

RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))  # mean/std of a Rayleigh variable, 1.913


def _uniform_painted(grid: SimGrid) -> Painted:
    return Painted(
        tissue=np.full((grid.nz, grid.nx), DEEP, np.uint8),
        labels=np.zeros((grid.nz, grid.nx), np.uint8),
        surface_z=np.full(grid.nx, np.inf),
        surface_slope=np.zeros(grid.nx),
    )


@pytest.mark.parametrize("profile_name", ["lumify", "telemed"])
def test_envelope_of_uniform_speckle_has_rayleigh_snr(profile_name):
    profile = load_profile(profile_name)
    grid = SimGrid(nz=600, nx=256, depth_mm=30.0, width_mm=30.0 * 256 / 600 * 2)
    rng = np.random.default_rng(1)
    scat = Scatterers.generate(profile, grid, (-grid.width_mm / 2 - 1, grid.width_mm / 2 + 1), (0.0, 0.0), rng)
    field = scat.field(Pose(0.0, 0.0, 0.0), grid, wavenumber2(profile))
    iq = beamform_iq(profile, grid, field, _uniform_painted(grid), attenuation=False, specular=False, rng=None)
    env = envelope(iq)
    tgc = 10 ** (profile.acquisition.tgc_db_per_cm * grid.zs / 200.0)
    inner = (env / tgc[:, None])[40:-40, 20:-20]  # away from the zero-padded borders
    snr = inner.mean() / inner.std()
    assert abs(snr - RAYLEIGH_SNR) < 0.08, snr
    # Fully developed speckle: the intensity is exponential, so its mean power is the
    # tissue's echogenicity (unit-energy PSF, unit power per cell).
    assert abs((inner**2).mean() / 0.55 - 1.0) < 0.1
    # Log compression destroys the Rayleigh law (sanity check that the test can fail).
    logged = 20 * np.log10(inner)
    assert abs(logged.mean() / logged.std() - RAYLEIGH_SNR) > 0.5


def test_demodulated_envelope_equals_hilbert_envelope_of_rf():
    """The IQ model (scatterer phase exp(-2jkz), envelope |IQ|) is the quadrature-demodulated
    form of RF lines: it must equal scipy's Hilbert envelope of the RF built explicitly."""
    profile = load_profile("lumify")
    k2 = wavenumber2(profile)
    # dz = 2 um samples the carrier finely; one 2 mm wide beam makes the lateral PSF a delta.
    grid = SimGrid(nz=3000, nx=1, depth_mm=6.0, width_mm=2.0)
    rng = np.random.default_rng(3)
    n = 40
    z = rng.uniform(1.0, 5.0, n).astype(np.float32)
    amp = rng.standard_normal(n).astype(np.float32)
    scat = Scatterers(np.zeros(n, np.float32), z, np.zeros(n, np.float32), amp, per_cell=1.0, sigma_e=10.0)
    field = scat.field(Pose(0.0, 0.0, 0.0), grid, k2)
    iq = beamform_iq(profile, grid, field, _uniform_painted(grid), attenuation=False, specular=False, rng=None)
    tgc = 10 ** (profile.acquisition.tgc_db_per_cm * grid.zs / 200.0)
    env_iq = envelope(iq)[:, 0].astype(np.float64) / tgc
    sigma = profile.psf.axial_fwhm_mm / 2.3548 / grid.dz
    kern = _gauss_kernel(sigma).astype(np.float64)
    zs = grid.zs
    cells = np.floor(z / grid.dz).astype(int)
    rf = np.zeros(grid.nz)
    half = len(kern) // 2
    for zi, ci, ai in zip(z, cells, amp):
        lo, hi = max(ci - half, 0), min(ci + half + 1, grid.nz)
        seg = zs[lo:hi] - zs[ci]
        rf[lo:hi] += ai * kern[lo - ci + half : hi - ci + half] * np.cos(k2 * seg + k2 * (zs[ci] - zi))
    env_rf = rf_envelope(rf)
    scale = float(env_iq @ env_rf / (env_rf @ env_rf))
    err = np.abs(env_iq - scale * env_rf)[200:-200].max() / env_rf.max()
    assert err < 0.03, err


def _render_first(profile_name: str, plan, scale=1.0):
    profile = load_profile(profile_name)
    return next(render_sweep(profile, plan, scale=scale, oversample=2, seed=7)), profile


def test_acoustic_shadow_under_bone():
    patient = sample_patient("P", np.random.default_rng(11))
    plan = plan_sweep(patient, "proximal_dorsal", 1, np.random.default_rng(0))
    (image, mask), profile = _render_first("lumify", plan)
    pitch = profile.geometry.pixel_mm
    above, below = [], []
    for c in np.flatnonzero(mask.any(axis=0)):
        r0 = int(np.argmax(mask[:, c] > 0))
        r1 = int(np.flatnonzero(mask[:, c] > 0).max())
        above.append(image[max(r0 - int(2.0 / pitch), 0) : r0 - int(0.4 / pitch), c])
        below.append(image[r1 + int(2.0 / pitch) : r1 + int(8.0 / pitch), c])
    above_mean = np.concatenate(above).mean()
    below_mean = np.concatenate(below).mean()
    assert len(above) > 50
    assert below_mean < 0.4 * above_mean, (below_mean, above_mean)


def test_edge_metrics_respond_to_blur_and_noise():
    patient = sample_patient("P", np.random.default_rng(2))
    plan = plan_sweep(patient, "dorsal", 1, np.random.default_rng(0))
    (image, mask), profile = _render_first("lumify", plan)
    pitch = profile.geometry.pixel_mm
    base = bone_edge_metrics(image, mask, pitch)
    blurred = bone_edge_metrics(cv2.GaussianBlur(image, (0, 0), 2.0), mask, pitch)
    noisy_img = np.clip(image + np.random.default_rng(0).normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    noisy = bone_edge_metrics(noisy_img, mask, pitch)
    assert blurred["sharpness"] < 0.8 * base["sharpness"]
    assert noisy["cnr"] < 0.8 * base["cnr"]


def test_telemed_has_lower_edge_sharpness_and_contrast_on_the_same_anatomy():
    sharp = defaultdict(list)
    cnr = defaultdict(list)
    for k, view in enumerate(("dorsal", "volar", "proximal_dorsal", "proximal_volar")):
        patient = sample_patient("P", np.random.default_rng(40 + k))
        plan = plan_sweep(patient, view, 2, np.random.default_rng(k))
        for name in ("lumify", "telemed"):
            profile = load_profile(name)
            for image, mask in render_sweep(profile, plan, scale=1.0, oversample=2, seed=k):
                m = bone_edge_metrics(image, mask, profile.geometry.pixel_mm)
                sharp[name].append(m["sharpness"])
                cnr[name].append(m["cnr"])
    lum_s, tel_s = np.nanmean(sharp["lumify"]), np.nanmean(sharp["telemed"])
    lum_c, tel_c = np.nanmean(cnr["lumify"]), np.nanmean(cnr["telemed"])
    assert tel_s < 0.8 * lum_s, (tel_s, lum_s)
    assert tel_c < 0.85 * lum_c, (tel_c, lum_c)
    # ...but the target is not hopeless: bone still stands out of the tissue above it.
    assert tel_c > 0.5


def _reference_labels(geom: Geometry, xs: np.ndarray, zs: np.ndarray, step: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Independent rasterization: matplotlib point-in-polygon at pixel centres, and the bone
    path length above each centre by dense sampling along the column. Returns the labels and
    a map of pixels whose path length is within the sampling error of the band edge."""
    from matplotlib.path import Path as MplPath

    labels = np.zeros((zs.size, xs.size), np.uint8)
    ambiguous = np.zeros_like(labels, dtype=bool)
    fine = np.arange(step / 2, zs.max() + step, step)
    for c, x in enumerate(xs):
        if not any(poly[:, 0].min() <= x <= poly[:, 0].max() for poly, _ in geom.bones):
            continue
        inside_fine = np.zeros(fine.size, bool)
        label_px = np.zeros(zs.size, np.uint8)
        for poly, lab in geom.bones:
            path = MplPath(poly)
            inside_fine |= path.contains_points(np.stack([np.full(fine.size, x), fine], 1))
            hit = path.contains_points(np.stack([np.full(zs.size, x), zs], 1))
            label_px[hit] = lab
        cum = np.concatenate([[0.0], np.cumsum(inside_fine) * step])
        path_len = cum[np.searchsorted(fine, zs)]
        labels[:, c] = np.where((label_px > 0) & (path_len <= geom.cortex_mm), label_px, 0)
        ambiguous[:, c] = (label_px > 0) & (np.abs(path_len - geom.cortex_mm) <= 2 * step)
    return labels, ambiguous


@pytest.mark.parametrize("seed", [5, 21])
def test_masks_match_an_independent_rasterization_of_the_geometry(seed):
    rng = np.random.default_rng(seed)
    patient = sample_patient("P", rng)
    patient.fracture = "break" if seed == 5 else "buckle"  # cover the fracture fragments too
    plan = plan_sweep(patient, "dorsal", 3, rng)
    profile = load_profile("telemed")
    scale = 0.45
    panel = panel_grid(profile, scale)
    frames = list(render_sweep(profile, plan, scale=scale, oversample=1, seed=1))
    top, left = round(profile.geometry.margin_top_px * scale), round(profile.geometry.margin_left_px * scale)
    for i in (2,):
        pose = plan.pose(i)
        assert pose.theta != 0.0
        geom = plan.geometry(i).transformed(pose)
        ref, ambiguous = _reference_labels(geom, panel.xs, panel.zs)
        ours = bone_band(geom, panel.xs, panel.zs)[0]
        assert (ref > 0).sum() > 100
        assert np.array_equal(ours[~ambiguous], ref[~ambiguous])
        assert ambiguous.sum() < 0.05 * (ref > 0).sum()
        # The written mask is that label map, placed inside the probe's screen layout.
        mask = frames[i][1]
        assert np.array_equal(mask[top : top + panel.nz, left : left + panel.nx], ours)
        assert mask.sum() == ours.sum()


def _highpass(img: np.ndarray) -> np.ndarray:
    """Speckle and fine texture only: the layout every frame shares (bright skin, dark shadow)
    would make any two wrist images correlate."""
    f = img.astype(np.float32)
    return (f - cv2.GaussianBlur(f, (0, 0), 3.0)).ravel()


def test_neighbouring_frames_correlate_far_more_than_other_videos(tiny_sites):
    site = load_site(tiny_sites[0])
    videos = defaultdict(list)
    for r in site.records:
        videos[r.videoname].append(site.read_image(r))
    raw_neighbours = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for fr in videos.values() for a, b in zip(fr, fr[1:])]
    hp = {v: [_highpass(im) for im in frames] for v, frames in videos.items()}
    neighbours = [np.corrcoef(a, b)[0, 1] for fr in hp.values() for a, b in zip(fr, fr[1:])]
    names = sorted(hp)
    # Same view of different patients: same layout, independent speckle.
    others = [
        np.corrcoef(hp[a][0], hp[b][0])[0, 1]
        for a in names
        for b in names
        if a < b and a.split("_")[0] != b.split("_")[0] and a.split("_", 1)[1] == b.split("_", 1)[1]
    ]
    assert np.mean(raw_neighbours) > 0.85, np.mean(raw_neighbours)
    assert np.mean(neighbours) > 0.6, np.mean(neighbours)
    assert np.mean(others) < 0.2, np.mean(others)
    # Frames drift apart along a sweep (the contrastive loss's frame gap relies on it).
    first_last = [np.corrcoef(fr[0], fr[-1])[0, 1] for fr in hp.values()]
    assert np.mean(first_last) < np.mean(neighbours) - 0.15


def test_label_policy_and_split_rules(tiny_sites):
    source, target = (load_site(p) for p in tiny_sites)
    assert all(r.labeled for r in source.records)
    assert {r.view for r in source.records} == set(SOURCE_VIEWS)
    assert {r.view for r in target.records} == set(TARGET_VIEWS)
    # Target: the paper's 12.5% label rate, spread over every patient and view.
    frac = np.mean([r.labeled for r in target.records])
    assert abs(frac - 0.125) < 0.01
    assert {r.patient for r in target.records if r.labeled} == {r.patient for r in target.records}
    assert {r.view for r in target.records if r.labeled} == set(TARGET_VIEWS)
    for r in target.records:
        assert target.mask_path(r).is_file() == r.labeled  # unlabeled frames have no mask file
    for site in (source, target):
        splits_of = defaultdict(set)
        for r in site.records:
            if r.split:
                splits_of[r.patient].add(r.split)
        assert all(len(s) == 1 for s in splits_of.values())  # no patient in two splits
    assert {r.split for r in source.records} == {"train", "val", "test"}
    test_patients = {r.patient for r in target.records if r.split == "test"}
    assert test_patients
    assert all(r.labeled for r in target.records if r.split == "test")
    # SSL pretraining frames come only from non-test patients; test patients' unlabeled frames are unused.
    assert all(r.patient not in test_patients for r in target.records if r.split == "train")
    assert all(r.split == "" for r in target.records if r.patient in test_patients and not r.labeled)
    ub = defaultdict(set)
    for r in target.records:
        if r.ub_split:
            assert r.labeled and r.split == "train"
            ub[r.patient].add(r.ub_split)
    assert all(len(s) == 1 for s in ub.values())
    assert {s for v in ub.values() for s in v} == {"train", "val"}


def test_same_seed_gives_identical_files_through_the_cli(tiny_sites, tmp_path):
    from pocus_edge.cli import main

    out = tmp_path / "again"
    montage = tmp_path / "montage.png"
    assert main(["simulate", str(out), "--data-preset", "tiny", "--seed", "0", "--no-progress", "--montage", str(montage)]) == 0
    for original in tiny_sites:
        again = out / original.name
        files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
        for rel in files:
            assert (original / rel).read_bytes() == (again / rel).read_bytes(), rel
    img = read_gray_png(montage)
    assert img.shape[0] > 100 and img.shape[1] > 200
    # Refuses to clobber an existing site without --overwrite (exit code 2, nothing written).
    assert main(["simulate", str(out), "--data-preset", "tiny", "--no-progress"]) == 2


def test_patient_subset_renders_identical_pixels_and_other_seed_differs(tiny_sites):
    target = load_site(tiny_sites[1])
    by_name = {r.filename: r for r in target.records}
    same = list(iter_site_frames("target", preset="tiny", seed=0, patients=[2]))
    assert len(same) == len(TARGET_VIEWS) * PRESETS["tiny"].frames_per_video
    for rec, image, mask in same:
        stored = by_name[rec.filename]
        assert stored.labeled == rec.labeled
        assert np.array_equal(target.read_image(stored), image)
        if rec.labeled:
            assert np.array_equal(target.read_mask(stored), mask)
    other = next(iter_site_frames("target", preset="tiny", seed=1, patients=[2]))
    assert not np.array_equal(other[1], same[0][1])


def test_frames_have_the_probe_sizes_and_bone_labels(tiny_sites):
    for root, profile_name in zip(tiny_sites, ("lumify", "telemed")):
        site = load_site(root)
        profile = load_profile(profile_name)
        g, scale = profile.geometry, PRESETS["tiny"].scale
        panel = panel_grid(profile, scale)
        expected = (
            panel.nz + round(g.margin_top_px * scale) + round(g.margin_bottom_px * scale),
            panel.nx + round(g.margin_left_px * scale) + round(g.margin_right_px * scale),
        )
        labels = set()
        for rec in site.records[:: max(1, len(site.records) // 40)]:
            assert site.read_image(rec).shape == expected
            if rec.labeled:
                labels |= set(np.unique(site.read_mask(rec)).tolist())
        assert labels <= {0, 1, 2, 3} and 1 in labels
    assert load_site(tiny_sites[0]).read_image(load_site(tiny_sites[0]).records[0]).shape != expected


def test_profiles_are_data_and_bad_ones_fail_with_the_file_name(tmp_path):
    text = (Path(load_profile("lumify").source)).read_text()
    custom = tmp_path / "myprobe.yaml"
    custom.write_text(text.replace("name: lumify", "name: myprobe").replace("center_mhz: 7.5", "center_mhz: 10.0"))
    prof = load_profile(custom)
    assert prof.name == "myprobe" and prof.psf.center_mhz == 10.0
    plan = plan_sweep(sample_patient("P", np.random.default_rng(0)), "dorsal", 1, np.random.default_rng(0))
    image, mask = next(render_sweep(prof, plan, scale=0.45, oversample=1))
    assert image.dtype == np.uint8 and image.shape == mask.shape
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("center_mhz:", "centre_mhz:"))
    with pytest.raises(ConfigError, match="typo.yaml"):
        load_profile(typo)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("dynamic_range_db: 58.0", "dynamic_range_db: -3"))
    with pytest.raises(ConfigError, match="bad.yaml.*dynamic_range_db"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="unknown probe profile"):
        load_profile("nosuchprobe")


def test_montage_shows_both_sites(tiny_sites, tmp_path):
    out = write_montage(*tiny_sites, tmp_path / "m.png", n=3)
    img = cv2.imread(str(out))
    assert img is not None and out.stat().st_size < 300_000
    # Label contours are drawn in colour on the grayscale frames.
    assert (np.abs(img[..., 2].astype(int) - img[..., 0].astype(int)) > 60).sum() > 50


def test_overwrite_replaces_a_simulated_site(tmp_path):
    small = PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "name": "mini", "frames_per_video": 2, "patients": 6})
    first = simulate_site(tmp_path / "s", domain="source", preset=small, seed=0)
    stale = first.images_dir / "stale.png"
    shutil.copy(first.image_path(first.records[0]), stale)
    second = simulate_site(tmp_path / "s", domain="source", preset=small, seed=3, overwrite=True)
    assert not stale.exists()
    assert len(second.records) == len(first.records)


def test_a_preset_too_small_for_the_splits_fails_before_writing(tmp_path):
    from pocus_edge.data.phantom import SimPreset, simulate
    from pocus_edge.errors import DataError

    too_small = SimPreset("two", patients=2, frames_per_video=2, frame_stride=1, scale=0.3, oversample=1, sweep_step_mm=0.3)
    with pytest.raises(DataError, match="patient"):
        simulate(tmp_path / "out", preset=too_small, progress=False)
    assert not (tmp_path / "out").exists()


def test_parallel_workers_write_identical_files(tmp_path):
    from pocus_edge.data.phantom import SimPreset

    mini = SimPreset("mini", patients=3, frames_per_video=1, frame_stride=1, scale=0.3, oversample=1, sweep_step_mm=0.3)
    one = simulate_site(tmp_path / "one", domain="source", preset=mini, seed=4)
    two = simulate_site(tmp_path / "two", domain="source", preset=mini, seed=4, workers=2)
    files = sorted(p.relative_to(one.root) for p in one.root.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 3 * len(SOURCE_VIEWS)
    assert files == sorted(p.relative_to(two.root) for p in two.root.rglob("*") if p.is_file())
    assert all((one.root / f).read_bytes() == (two.root / f).read_bytes() for f in files)


def test_shift_severity_interpolates_every_knob_between_the_two_probes():
    from pocus_edge.data.phantom_profiles import SECTIONS, interpolate_profiles, load_profile
    from pocus_edge.errors import ConfigError

    lumify, telemed = load_profile("lumify"), load_profile("telemed")
    assert interpolate_profiles(lumify, telemed, 0.0).to_dict() | {"name": "", "description": ""} == \
        lumify.to_dict() | {"name": "", "description": ""}
    assert interpolate_profiles(lumify, telemed, 1.0).to_dict() | {"name": "", "description": ""} == \
        telemed.to_dict() | {"name": "", "description": ""}
    half = interpolate_profiles(lumify, telemed, 0.5)
    assert half.psf.lateral_fwhm_mm == pytest.approx((0.42 + 0.85) / 2)
    assert half.display.black_level == round((0 + 18) / 2) and isinstance(half.display.black_level, int)
    assert half.geometry.depth_ticks is True and interpolate_profiles(lumify, telemed, 0.4).geometry.depth_ticks is False
    # Every numeric knob lies between the two probes' values.
    for key in SECTIONS:
        for name, value in vars(getattr(interpolate_profiles(lumify, telemed, 0.3), key)).items():
            a, b = getattr(getattr(lumify, key), name), getattr(getattr(telemed, key), name)
            if not isinstance(a, bool):
                assert min(a, b) - 0.5 <= value <= max(a, b) + 0.5, (key, name)
    with pytest.raises(ConfigError, match="shift severity"):
        interpolate_profiles(lumify, telemed, 1.5)
