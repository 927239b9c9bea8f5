"""The per-frame risk formulas (torch graph and numpy twin) and the EWMA drift alarm, against
closed forms: the alarm delay of a step change, Dice of known masks, batch independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pocus_edge.errors import ConfigError
from pocus_edge.models.risk import (
    RISK_EPS,
    branch_disagreement,
    branch_disagreement_np,
    self_disagreement,
    self_disagreement_np,
)
from pocus_edge.runtime.drift import DriftBand, DriftMonitor, ewma


def test_torch_and_numpy_risk_agree_on_random_maps():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 1, 16, 16, generator=gen), torch.rand(5, 1, 16, 16, generator=gen)
    got = branch_disagreement(a, b).numpy()[:, 0]
    ref = branch_disagreement_np(a.numpy()[:, 0], b.numpy()[:, 0])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(self_disagreement(a).numpy()[:, 0], self_disagreement_np(a.numpy()[:, 0]), rtol=1e-5, atol=1e-6)


def test_risk_of_known_masks():
    m = np.zeros((8, 8))
    m[2:4, 2:6] = 1  # 8 pixels
    assert branch_disagreement_np(m, m) == pytest.approx(0.0)
    empty = np.zeros((8, 8))
    assert branch_disagreement_np(empty, empty) == pytest.approx(0.0)  # two empty maps agree
    other = np.zeros((8, 8))
    other[6:8, 0:4] = 1  # 8 disjoint pixels
    assert branch_disagreement_np(m, other) == pytest.approx(1.0 - RISK_EPS / (16 + RISK_EPS))
    half = np.zeros((8, 8))
    half[2:4, 2:4] = 1  # 4 of m's 8 pixels: Dice = (2*4 + 1) / (12 + 1)
    assert branch_disagreement_np(m, half) == pytest.approx(1.0 - 9.0 / 13.0)
    # A crisp map has no self-disagreement; a map of 0.6 everywhere has a lot.
    assert self_disagreement_np(m) == pytest.approx(0.0)
    flat = np.full((8, 8), 0.6)
    assert self_disagreement_np(flat) == pytest.approx(1.0 - (2 * 0.6 * 64 + 1) / (0.6 * 64 + 64 + 1))


def test_risk_is_batch_independent():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, 1, 12, 12, generator=gen), torch.rand(4, 1, 12, 12, generator=gen)
    together = branch_disagreement(a, b)
    alone = torch.cat([branch_disagreement(a[k:k + 1], b[k:k + 1]) for k in range(4)])
    torch.testing.assert_close(together, alone)
    assert together.shape == (4, 1)


def test_risk_sums_in_float32_under_half_precision():
    p = torch.full((1, 1, 224, 224), 0.9, dtype=torch.float16)
    r = branch_disagreement(p, p)
    assert torch.isfinite(r).all() and r.dtype == torch.float32
    # sum(p*p) = 0.81 * 50176 exceeds fp16's 65504 when p = 1; the float32 sums keep it finite.
    ones = torch.ones((1, 1, 224, 224), dtype=torch.float16)
    assert float(branch_disagreement(ones, ones)) == pytest.approx(0.0, abs=1e-6)


def test_monitor_follows_the_reference_ewma():
    rng = np.random.default_rng(0)
    r = rng.uniform(0, 0.2, 300)
    band = DriftBand(center=0.1, half_width=10.0, lam=0.2)
    mon = DriftMonitor(band)
    zs = []
    for x in r:
        mon.update(x)
        zs.append(mon.z)
    np.testing.assert_allclose(zs, ewma(r, 0.2, 0.1))
    assert mon.report()["alarms"] == 0


def test_calibration_center_and_width():
    rng = np.random.default_rng(1)
    seqs = [rng.normal(0.3, 0.05, 400), rng.normal(0.3, 0.05, 300)]
    band = DriftBand.calibrate(seqs, lam=0.1, k=4.0)
    assert band.center == pytest.approx(np.concatenate(seqs).mean())
    z = np.concatenate([ewma(s, 0.1, band.center) for s in seqs])
    assert band.half_width == pytest.approx(4.0 * z.std())
    # For i.i.d. input the EWMA's sd is sigma * sqrt(lam / (2 - lam)) (up to sampling error).
    assert z.std() == pytest.approx(0.05 * math.sqrt(0.1 / 1.9), rel=0.25)


@pytest.mark.parametrize("step", [+1, -1])
def test_alarm_delay_of_a_step_matches_the_closed_form(step):
    lam, half, d = 0.1, 0.05, 0.2
    band = DriftBand(center=0.3, half_width=half, lam=lam)
    mon = DriftMonitor(band)
    for t in range(100):
        mon.update(0.3)
    assert not mon.alarm
    # After a step of size d, z - center = d (1 - (1 - lam)^t): first t with that > half.
    expected = math.ceil(math.log(1 - half / d) / math.log(1 - lam))
    fired = None
    for t in range(1, 200):
        if mon.update(0.3 + step * d, index=99 + t) and fired is None:
            fired = t
    assert fired == expected
    assert mon.intervals == [[99 + expected, 99 + 199]]


def test_hysteresis_makes_one_interval_per_excursion():
    band = DriftBand(center=0.0, half_width=1.0, lam=1.0, hysteresis=0.5)
    mon = DriftMonitor(band)
    # lam = 1: z is the risk itself. 1.5 trips the alarm, 0.8 keeps it (above 0.5), 0.2 clears it.
    for x in [0.0, 1.5, 0.8, 1.2, 0.2, 0.0, 1.1, 0.1]:
        mon.update(x)
    assert mon.intervals == [[1, 3], [6, 6]]
    assert not mon.alarm


def test_nonfinite_risk_is_counted_not_used():
    mon = DriftMonitor(DriftBand(center=0.0, half_width=1.0, lam=0.5))
    mon.update(0.4)
    z = mon.z
    mon.update(float("nan"))
    assert mon.z == z and mon.report()["nonfinite_risks"] == 1


def test_bad_bands_are_refused():
    with pytest.raises(ConfigError, match="calibration frames"):
        DriftBand.calibrate([[0.1] * 10])
    with pytest.raises(ConfigError, match="NaN"):
        DriftBand.calibrate([[0.1] * 60 + [float("nan")]])
    with pytest.raises(ConfigError, match="lambda"):
        DriftBand(center=0.0, half_width=1.0, lam=0.0)
    with pytest.raises(ConfigError, match="half_width"):
        DriftBand.from_dict({"center": 0.1})
    band = DriftBand.calibrate([[0.2] * 80])  # a constant risk still gets a band
    assert band.half_width > 0
    assert DriftBand.from_dict(band.to_dict()) == band
