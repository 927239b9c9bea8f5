"""The drift test, as declared in benchmarks/notes/drift_protocol.md (read it first):
a stream that switches SOURCE (lumify) -> TARGET (telemed) -> THIRD (drift-third, defined in the
note) through a model's risk output and the runtime's drift alarm; alarm delays, false alarms per
10,000 in-distribution frames, and the added latency of the score and the alarm.

    python benchmarks/drift_bench.py --model fused_risk.onnx --out drift_out/
    python benchmarks/drift_bench.py -g RUN_MIM/model.safetensors -c RUN_CON/model.safetensors --out drift_out/
    python benchmarks/drift_bench.py --model m.onnx --out smoke/ --preset tiny --calib-patients 3 \\
        --segment-frames 24 --id-frames 500 --latency-repeats 1        # a smoke run (numbers mean nothing)

Writes ``drift.json`` and ``drift.md`` to --out (atomically), plus ``drift-third.yaml`` (the
third profile it loads, like any user profile) and, for -g/-c, the fused export with its risk
output. Frames come from the simulator (``pocus_edge.data.phantom.iter_site_frames``); the risk,
the band and the alarm are the project's own (the exported graph's ``risk`` output,
``DriftBand.calibrate``, ``DriftMonitor``, ``run_stream``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

# The THIRD profile, exactly as declared in benchmarks/notes/drift_protocol.md (before measuring).
THIRD_PROFILE = {
    "name": "drift-third",
    "description": "Drift test: low-frequency deep probe, high gain, strong post-filter, steep gray map.",
    "geometry": {"depth_mm": 45.0, "width_mm": 42.0, "pixel_mm": 0.21, "scan_lines": 96, "margin_top_px": 4,
                 "margin_bottom_px": 16, "margin_left_px": 24, "margin_right_px": 4, "border_level": 30,
                 "depth_ticks": False},
    "psf": {"center_mhz": 3.5, "axial_fwhm_mm": 0.65, "lateral_fwhm_mm": 1.30, "lateral_growth_per_cm": 0.70,
            "focus_mm": 22.0, "elevation_fwhm_mm": 3.0},
    "acquisition": {"scatterers_per_resolution_cell": 10.0, "specular_gain": 0.3, "specular_angle_power": 2.0,
                    "bone_echo_db": -9.0, "tgc_db_per_cm": 1.5, "noise_db": -24.0},
    "display": {"gain_db": -12.0, "dynamic_range_db": 42.0, "black_level": 30, "white_level": 240, "gamma": 1.4,
                "smoothing_px": 1.6, "gray_noise": 10.0},
}
GOAL_DELAY, GOAL_FALSE_PER_10K, GOAL_ADDED_LATENCY = 30, 1.0, 0.05


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="fused (or student) ONNX export with its risk output")
    ap.add_argument("-g", "--generative", help="fine-tuned generative checkpoint (with -c: exported here with --risk)")
    ap.add_argument("-c", "--contrastive", help="fine-tuned contrastive checkpoint")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--preset", default="study", help="simulator data preset (sizes of the recordings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-patients", type=int, default=20)
    ap.add_argument("--segment-frames", type=int, default=300)
    ap.add_argument("--id-frames", type=int, default=20_000)
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if (args.model is None) == (args.generative is None and args.contrastive is None):
        ap.error("give --model FUSED.onnx, or -g GEN -c CON")
    return args


def fused_with_risk(args, out: Path) -> Path:
    """The model to test: --model, or the -g/-c pair exported here with its risk output."""
    if args.model is not None:
        return Path(args.model)
    import inspect

    from pocus_edge.export.api import ExportOptions, export_checkpoints

    if "risk" not in inspect.signature(export_checkpoints).parameters:
        sys.exit("error: this pocus-edge cannot export the risk output yet (export_checkpoints has no risk=)")
    path = out / "fused_risk.onnx"
    export_checkpoints(args.generative, args.contrastive, path, ExportOptions(parity_frames=0), risk=True)
    return path


class Risks:
    """The graph's per-frame risk, through the project's inference backend."""

    def __init__(self, model: Path, threads: int):
        from pocus_edge.inference import open_backend

        self.backend = open_backend(model, "ort", threads=threads)

    def __call__(self, frames: list[np.ndarray], batch: int = 8) -> np.ndarray:
        be, out = self.backend, []
        for i in range(0, len(frames), batch):
            result = be.run(np.stack([be.prepare(f) for f in frames[i:i + batch]]))
            if result.get("risk") is None:
                sys.exit(f"error: {getattr(be, 'path', 'the model')}: no risk output (export it with --risk)")
            out.append(np.asarray(result["risk"], np.float64).reshape(-1))
        return np.concatenate(out) if out else np.empty(0)


def recordings(domain: str, profile, args, patients: range) -> list[list[np.ndarray]]:
    """Whole recordings (frame order) of these patients, rendered with ``profile``."""
    from pocus_edge.data.phantom import iter_site_frames

    by_video: dict[str, list[np.ndarray]] = {}
    for rec, image, _ in iter_site_frames(domain, preset=args.preset, seed=args.seed, profile=profile,
                                          patients=list(patients)):
        by_video.setdefault(rec.videoname, []).append(image)
    return list(by_video.values())


def segment(recs: list[list[np.ndarray]], length: int) -> list[np.ndarray]:
    frames = [f for r in recs for f in r]
    if len(frames) < length:
        sys.exit(f"error: only {len(frames)} frames for a segment of {length}; use fewer --calib-patients or a larger --preset")
    return frames[:length]


def delay_after(alarm: np.ndarray, change: int, end: int, want_on: bool) -> dict:
    """Frames from ``change`` to the first frame (< end) whose alarm state is ``want_on``."""
    hits = np.flatnonzero(alarm[change:end] == want_on)
    if not hits.size:
        return {"frames": None, "state": "missed" if want_on else "never cleared"}
    return {"frames": int(hits[0]), "state": "carried" if hits[0] == 0 and want_on else "raised" if want_on else "cleared"}


def monitor_run(band, risks: np.ndarray) -> tuple[np.ndarray, dict]:
    from pocus_edge.runtime.drift import DriftMonitor

    mon = DriftMonitor(band)
    alarm = np.array([mon.update(r, i) for i, r in enumerate(risks)], bool)
    return alarm, mon.report()


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(risk of a positive frame > a negative's), ties counting half (Mann-Whitney)."""
    values = np.concatenate([positive, negative])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def latency(model: Path, frames: list[np.ndarray], band, args, out: Path) -> dict:
    """(a) graph with risk + band vs (b) the same graph without its risk output, alternated."""
    import onnx

    from pocus_edge.inference import open_backend
    from pocus_edge.runtime.base import FrameSource
    from pocus_edge.runtime.drift import DriftMonitor
    from pocus_edge.runtime.pipeline import StreamOptions, run_stream
    from pocus_edge.runtime.risk import RiskSetup

    proto = onnx.load(str(model))
    kept = [o for o in proto.graph.output if o.name != "risk"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    stripped = out / "without_risk.onnx"
    onnx.save(proto, str(stripped))

    class Frames(FrameSource):
        name = "drift-switch-stream"

        def __len__(self):
            return len(frames)

        def __iter__(self):
            for i, f in enumerate(frames):
                yield f, i * 33.3, i

    runs: dict[str, list[float]] = {"with_risk": [], "without_risk": []}
    reports = {}
    for _ in range(max(1, args.latency_repeats)):
        for name, path, setup in (("with_risk", model, RiskSetup(band=band, source="drift bench")),
                                  ("without_risk", stripped, RiskSetup())):
            be = open_backend(path, "ort", threads=args.threads)
            try:
                rep = run_stream(Frames(), be, options=StreamOptions(progress=False), risk=setup)
            finally:
                be.close()
            runs[name].append(rep["latency_ms"]["mean"])
            reports[name] = rep
    with_risk, without = float(np.median(runs["with_risk"])), float(np.median(runs["without_risk"]))
    mon = DriftMonitor(band)
    values = np.random.default_rng(0).normal(band.center, band.half_width / 5, 100_000).tolist()
    t0 = time.perf_counter_ns()
    for i, r in enumerate(values):
        mon.update(r, i)
    per_update_ns = (time.perf_counter_ns() - t0) / len(values)
    return {"mean_ms_with_risk": runs["with_risk"], "mean_ms_without_risk": runs["without_risk"],
            "median_with_risk_ms": with_risk, "median_without_risk_ms": without,
            "added_fraction": with_risk / without - 1.0 if without > 0 else None,
            "monitor_update_ns": per_update_ns, "stream_report_with_risk": reports["with_risk"].get("risk")}


def main(argv=None) -> int:
    from pocus_edge.data.phantom_profiles import load_profile
    from pocus_edge.io import write_json_atomic, write_text_atomic
    from pocus_edge.runtime.drift import DriftBand

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    third_path = write_text_atomic(out / "drift-third.yaml", yaml.safe_dump(THIRD_PROFILE, sort_keys=False))
    third = load_profile(third_path)
    model = fused_with_risk(args, out)
    risk_of = Risks(model, args.threads)
    from pocus_edge.data.phantom import get_preset

    n_patients, C, L = get_preset(args.preset).patients, args.calib_patients, args.segment_frames
    if not 0 < C < n_patients:
        sys.exit(f"error: --calib-patients must be in 1..{n_patients - 1} for preset {args.preset}")
    calib, stream_pat = range(C), range(C, n_patients)

    # 1. Bands: target-calibrated (deployment, primary) and source-calibrated, per recording.
    bands = {}
    for name, domain, profile in (("target", "target", "telemed"), ("source", "source", "lumify")):
        seqs = [risk_of(r) for r in recordings(domain, profile, args, calib)]
        bands[name] = DriftBand.calibrate(seqs)
    # 2. The switch stream and the in-distribution recordings.
    target_recs = recordings("target", "telemed", args, stream_pat)
    segments = {"SOURCE": segment(recordings("source", "lumify", args, stream_pat), L),
                "TARGET": segment(target_recs, L),
                "THIRD": segment(recordings("target", third, args, stream_pat), L)}
    switch_frames = [f for s in segments.values() for f in s]
    switch_risk = risk_of(switch_frames)
    rec_risks = [risk_of(r) for r in target_recs]
    rng = np.random.default_rng(args.seed)
    id_parts, total = [], 0
    while total < args.id_frames:
        for k in rng.permutation(len(rec_risks)):
            id_parts.append(rec_risks[k])
            total += len(rec_risks[k])
    id_risk = np.concatenate(id_parts)[: args.id_frames]

    # 3. Metrics per band.
    results = {}
    for name, band in bands.items():
        alarm, report = monitor_run(band, switch_risk)
        changes = {}
        for c, (before, after) in ((L, ("SOURCE", "TARGET")), (2 * L, ("TARGET", "THIRD"))):
            into_own = after.lower() == name  # into the band's own probe: the alarm should clear
            changes[f"{before}->{after}"] = {"frame": c, "kind": "clear" if into_own else "raise",
                                            **delay_after(alarm, c, c + L, want_on=not into_own)}
        id_alarm, id_report = monitor_run(band, id_risk)
        results[name] = {"band": band.to_dict(), "switch_alarm_intervals": report["alarm_intervals"],
                         "alarm_on_at_start_of_segment": {s: bool(alarm[i * L]) for i, s in enumerate(segments)},
                         "changes": changes, "id_alarms": id_report["alarms"],
                         "false_alarms_per_10k": id_report["alarms"] * 10_000 / len(id_risk)}
    seg_risk = {s: switch_risk[i * L:(i + 1) * L] for i, s in enumerate(segments)}
    # 4. Latency, and the runtime's report against the offline monitor.
    lat = latency(model, switch_frames, bands["target"], args, out)
    runtime_intervals = (lat.pop("stream_report_with_risk") or {}).get("drift", {}).get("alarm_intervals")
    goal_events = [results["target"]["changes"]["TARGET->THIRD"], results["source"]["changes"]["SOURCE->TARGET"]]
    delays = [e["frames"] for e in goal_events]
    payload = {
        "protocol": "benchmarks/notes/drift_protocol.md", "model": str(model), "preset": args.preset, "seed": args.seed,
        "calibration_patients": C, "segment_frames": L, "id_frames": len(id_risk),
        "id_distinct_frames": int(sum(len(r) for r in rec_risks)),
        "segments": {s: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                         "auroc_vs_in_distribution": auroc(v, id_risk) if s != "TARGET" else None}
                     for s, v in seg_risk.items()},
        "bands": results, "latency": lat,
        "runtime_report_equals_offline_monitor": runtime_intervals == results["target"]["switch_alarm_intervals"],
        "goals": {
            "alarm_delay_frames": delays,
            "alarm_within_30": all(d is not None and d <= GOAL_DELAY for d in delays),
            "false_alarms_per_10k": results["target"]["false_alarms_per_10k"],
            "false_alarms_ok": results["target"]["false_alarms_per_10k"] <= GOAL_FALSE_PER_10K,
            "added_latency": lat["added_fraction"],
            "latency_ok": lat["added_fraction"] is not None and lat["added_fraction"] < GOAL_ADDED_LATENCY,
        },
    }
    write_json_atomic(out / "drift.json", payload)
    write_text_atomic(out / "drift.md", markdown(payload))
    print((out / "drift.md").read_text())
    return 0


def markdown(p: dict) -> str:
    g = p["goals"]
    lines = [
        "# Drift test (protocol: benchmarks/notes/drift_protocol.md)", "",
        f"Model `{p['model']}`, preset `{p['preset']}`, seed {p['seed']}, {p['calibration_patients']} calibration "
        f"patients, segments of {p['segment_frames']} frames, in-distribution stream of {p['id_frames']} frames "
        f"({p['id_distinct_frames']} distinct).", "",
        "| segment | risk median | risk p95 | AUROC vs in-distribution (< 0.5: lower risk) |", "|---|---:|---:|---:|",
    ]
    for s, v in p["segments"].items():
        au = "-" if v["auroc_vs_in_distribution"] is None else f"{v['auroc_vs_in_distribution']:.3f}"
        lines.append(f"| {s} | {v['median']:.4f} | {v['p95']:.4f} | {au} |")
    lines += ["", "| band | change | kind | delay (frames) | state | false alarms / 10k |", "|---|---|---|---:|---|---:|"]
    for name, r in p["bands"].items():
        for change, e in r["changes"].items():
            d = "-" if e["frames"] is None else str(e["frames"])
            lines.append(f"| {name} | {change} | {e['kind']} | {d} | {e['state']} | {r['false_alarms_per_10k']:.2f} |")
    lat = p["latency"]
    added = "-" if lat["added_fraction"] is None else f"{100 * lat['added_fraction']:+.2f} %"
    lines += ["", f"Latency (mean end to end, median of repeats): {lat['median_with_risk_ms']:.3f} ms with the risk "
              f"and the alarm, {lat['median_without_risk_ms']:.3f} ms without: {added}; one monitor update "
              f"{lat['monitor_update_ns']:.0f} ns. Runtime report equals the offline monitor: "
              f"{p['runtime_report_equals_offline_monitor']}.", "",
              f"Goals: alarm within 30 frames {g['alarm_within_30']} (delays {g['alarm_delay_frames']}); "
              f"<= 1 false alarm / 10k {g['false_alarms_ok']} ({g['false_alarms_per_10k']:.2f}); "
              f"< 5 % added latency {g['latency_ok']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
