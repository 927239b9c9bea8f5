"""Probe profiles of the simulator: every knob of the simulated image formation, as data.

A profile is a YAML file with four sections (``geometry``, ``psf``, ``acquisition``,
``display``); the bundled ``lumify`` (source) and ``telemed`` (target) live in
``pocus_edge/data/profiles/``. Users add a probe by writing another file and passing its
path wherever a profile name is accepted. Unknown or mistyped keys are refused with a
one-line :class:`~pocus_edge.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import apply_overrides, to_dict
from ..errors import ConfigError

PROFILES_DIR = Path(__file__).with_name("profiles")


@dataclass
class ProbeGeometry:
    depth_mm: float = 30.0
    width_mm: float = 34.0
    pixel_mm: float = 0.15
    scan_lines: int = 192
    margin_top_px: int = 0
    margin_bottom_px: int = 0
    margin_left_px: int = 0
    margin_right_px: int = 0
    border_level: int = 0
    depth_ticks: bool = False


@dataclass
class ProbePSF:
    center_mhz: float = 7.5
    axial_fwhm_mm: float = 0.22
    lateral_fwhm_mm: float = 0.42
    lateral_growth_per_cm: float = 0.25
    focus_mm: float = 12.0
    elevation_fwhm_mm: float = 1.6


@dataclass
class ProbeAcquisition:
    scatterers_per_resolution_cell: float = 10.0
    specular_gain: float = 1.0
    specular_angle_power: float = 4.0
    bone_echo_db: float = 0.0
    tgc_db_per_cm: float = 6.5
    noise_db: float = -52.0


@dataclass
class ProbeDisplay:
    gain_db: float = -6.0
    dynamic_range_db: float = 58.0
    black_level: int = 0
    white_level: int = 255
    gamma: float = 1.0
    smoothing_px: float = 0.0
    gray_noise: float = 1.0


SECTIONS = {"geometry": ProbeGeometry, "psf": ProbePSF, "acquisition": ProbeAcquisition, "display": ProbeDisplay}


@dataclass
class ProbeProfile:
    """One probe's image formation. ``source`` is the file it came from (for messages)."""

    name: str
    description: str = ""
    geometry: ProbeGeometry = field(default_factory=ProbeGeometry)
    psf: ProbePSF = field(default_factory=ProbePSF)
    acquisition: ProbeAcquisition = field(default_factory=ProbeAcquisition)
    display: ProbeDisplay = field(default_factory=ProbeDisplay)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for key in SECTIONS:
            out[key] = to_dict(getattr(self, key))
        return out

    def replace(self, **sections: dict[str, Any]) -> "ProbeProfile":
        """Copy with some knobs changed, e.g. ``p.replace(psf={"lateral_fwhm_mm": 1.0})``."""
        changes: dict[str, Any] = {}
        for key, values in sections.items():
            if key not in SECTIONS:
                raise ConfigError(f"profile {self.name}: unknown section {key!r}; known: {', '.join(SECTIONS)}")
            changes[key] = apply_overrides(getattr(self, key), values)
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ProbeProfile":
        g, p, a, d = self.geometry, self.psf, self.acquisition, self.display
        where = self.source or self.name
        checks = [
            (g.depth_mm > 0 and g.width_mm > 0, "geometry.depth_mm and width_mm must be > 0"),
            (g.pixel_mm > 0, "geometry.pixel_mm must be > 0"),
            (g.scan_lines >= 8, "geometry.scan_lines must be >= 8"),
            (min(g.margin_top_px, g.margin_bottom_px, g.margin_left_px, g.margin_right_px) >= 0, "margins must be >= 0"),
            (0 <= g.border_level <= 255, "geometry.border_level must be 0..255"),
            (p.center_mhz > 0, "psf.center_mhz must be > 0"),
            (min(p.axial_fwhm_mm, p.lateral_fwhm_mm, p.elevation_fwhm_mm) > 0, "psf widths must be > 0"),
            (p.lateral_growth_per_cm >= 0, "psf.lateral_growth_per_cm must be >= 0"),
            (a.scatterers_per_resolution_cell > 0, "acquisition.scatterers_per_resolution_cell must be > 0"),
            (a.specular_gain >= 0, "acquisition.specular_gain must be >= 0"),
            (d.dynamic_range_db > 0, "display.dynamic_range_db must be > 0"),
            (0 <= d.black_level < d.white_level <= 255, "display needs 0 <= black_level < white_level <= 255"),
            (d.gamma > 0, "display.gamma must be > 0"),
            (d.smoothing_px >= 0 and d.gray_noise >= 0, "display.smoothing_px and gray_noise must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{where}: {message}")
        return self


def interpolate_profiles(source: "ProbeProfile", target: "ProbeProfile", severity: float) -> "ProbeProfile":
    """The probe ``severity`` of the way from ``source`` to ``target``: every numeric knob
    ``s + severity * (t - s)`` (integers rounded), every switch (``depth_ticks``) the target's from
    severity 0.5 on. 0 is the source probe, 1 the target probe; values in between make a study of
    gain against the size of the domain gap possible without hand-made profiles."""
    if not 0.0 <= float(severity) <= 1.0:
        raise ConfigError(f"shift severity must be in [0, 1], got {severity}")
    sections: dict[str, Any] = {}
    for key in SECTIONS:
        a, b = getattr(source, key), getattr(target, key)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if isinstance(va, bool):
                values[f.name] = vb if severity >= 0.5 else va
            elif isinstance(va, int):
                values[f.name] = int(round(va + severity * (vb - va)))
            else:
                values[f.name] = float(va + severity * (vb - va))
        sections[key] = dataclasses.replace(a, **values)
    name = f"{source.name}-to-{target.name}@{severity:g}"
    return ProbeProfile(name=name, description=f"{severity:g} of the way from {source.name} to {target.name}",
                        source=name, **sections).validate()


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path | ProbeProfile) -> ProbeProfile:
    """A bundled profile by name (``lumify``, ``telemed``) or any profile YAML by path."""
    if isinstance(name_or_path, ProbeProfile):
        return name_or_path.validate()
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = PROFILES_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown probe profile {text!r}; bundled: {', '.join(builtin_profiles())}, or pass a YAML path")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such probe profile file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"{path}: a probe profile is a mapping with a 'name' and sections {', '.join(SECTIONS)}")
    unknown = set(data) - {"name", "description", *SECTIONS}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected name, description, {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        values = data.get(key) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping")
        try:
            sections[key] = apply_overrides(cls(), values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    profile = ProbeProfile(
        name=data["name"], description=str(data.get("description", "")), source=str(path), **sections
    )
    return profile.validate()
