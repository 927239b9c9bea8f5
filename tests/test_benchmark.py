"""`pocus-edge benchmark` and `benchmark compare` on the tiny preset.

Properties checked: every format whose toolchain is present gives an ok row whose mask agreement
reaches its precision's bar; a missing toolchain gives a skipped row with its reason; a planted
failing, wrong or hanging format does not stop the others; the Dice the report gives equals a
brute-force recomputation; the JSON validates against the package's schema (and the schema
rejects broken reports); compare's ratios, compute floors and fractions follow their formulas.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pocus_edge.benchmark import formats as fmt
from pocus_edge.benchmark import runner
from pocus_edge.benchmark.compare import compare_reports, load_devices, match_device
from pocus_edge.benchmark.formats import AGREEMENT_BARS, FORMATS, FormatSpec, Prepared
from pocus_edge.benchmark.machine import native_bf16_cpu
from pocus_edge.benchmark.runner import BenchmarkOptions, run_benchmark
from pocus_edge.benchmark.schema import REPORT_SCHEMA, SCHEMA_VERSION, validate_report
from pocus_edge.data.layout import FrameRecord, SiteWriter
from pocus_edge.errors import DataError

TORCH_FORMATS = ["eager-2model", "fused-fp32", "fused-bf16", "fused-fp16", "tensorrt-fp16", "tensorrt-int8", "coreml-fp16"]


def _make_site(root: Path, n: int = 6) -> Path:
    """A tiny labeled target site: smooth random frames (non-square, so padding is exercised)
    with masks that follow the bright regions."""
    import cv2

    rng = np.random.default_rng(3)
    writer = SiteWriter(root)
    for i in range(n):
        small = rng.random((6, 8)).astype(np.float32)
        image = (cv2.resize(small, (96, 72), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)
        mask = (image > 140).astype(np.uint8) * (1 + i % 3)
        writer.add(FrameRecord(f"f{i}.png", f"p{i // 3}_v", i, patient=f"p{i // 3}", split="test"), image, mask)
    writer.close()
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return _make_site(tmp_path_factory.mktemp("bench") / "target")


def _options(site: Path, formats: list[str], **kw) -> BenchmarkOptions:
    base = dict(preset="tiny", data=site, formats=formats, batches=(1, 2), runs=2, warmup=1, min_runs=1,
                max_frames=5, eval_batch=2, probe=False, threads=1)
    base.update(kw)
    return BenchmarkOptions(**base)


def _expected_skip(name: str) -> str | None:
    """Which rows must be skipped here, decided independently of the formats module."""
    if name.startswith("tensorrt") and importlib.util.find_spec("tensorrt") is None:
        return "tensorrt"
    if name.startswith("openvino") and importlib.util.find_spec("openvino") is None:
        return "openvino"
    if name.startswith("coreml") and platform.system() != "Darwin":
        return "macOS"
    if name == "fused-fp16":
        return "CUDA"
    if "bf16" in name and not native_bf16_cpu():
        return "bf16"
    return None


def _check_rows(report: dict) -> None:
    for row in report["rows"]:
        skip = _expected_skip(row["format"])
        if skip:
            assert row["status"] == "skipped", row
            assert skip in row["reason"], row
            assert row["latency"] == []
            continue
        assert row["status"] == "ok", row
        assert row["agreement_dice"] >= AGREEMENT_BARS[row["precision"]], row
        assert [lat["batch"] for lat in row["latency"]] == [1, 2]
        for lat in row["latency"]:
            assert lat["p95_ms"] >= lat["p50_ms"] > 0
            assert lat["fps"] == pytest.approx(lat["batch"] * 1000.0 / lat["p50_ms"])
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["iou"] <= row["dice"] + 1e-12
        assert row["artifact_bytes"] > 0


@pytest.fixture(scope="module")
def torch_report(site) -> dict:
    return run_benchmark(_options(site, TORCH_FORMATS))


def test_torch_rows_ok_or_skipped_with_reason(torch_report):
    assert [r["format"] for r in torch_report["rows"]] == [n for n in FORMATS if n in TORCH_FORMATS]
    _check_rows(torch_report)
    # fp32 paths compute the same function: identical masks up to summation order.
    by_name = {r["format"]: r for r in torch_report["rows"]}
    assert by_name["fused-fp32"]["agreement_dice"] == pytest.approx(1.0, abs=1e-3)
    assert by_name["fused-fp32"]["max_abs_diff"] < 1e-4


def test_reported_dice_matches_brute_force(site, torch_report):
    """Rebuild the same seeded model and frames, predict with plain torch, score with a
    hand-written per-image Dice/IoU (smoothing 1): must equal the report's fused-fp32 row."""
    opts = _options(site, ["fused-fp32"])
    fused, _, _ = runner._build_fused(opts, torch.device("cpu"))
    frames, masks, _ = runner._eval_frames(opts, fused.img_size)
    runner._decisive_random_head(fused, frames, torch.device("cpu"))
    with torch.inference_mode():
        probs = fused(torch.from_numpy(frames)).numpy()
    dices, ious = [], []
    for p, y in zip(probs, masks):
        pred, true = p[0] > 0.5, y[0] > 0.5
        inter = float(np.sum(pred & true))
        dices.append((2 * inter + 1) / (pred.sum() + true.sum() + 1))
        ious.append((inter + 1) / (np.sum(pred | true) + 1))
    row = next(r for r in torch_report["rows"] if r["format"] == "fused-fp32")
    assert len(frames) == 5 and torch_report["data"]["frames"] == 5
    assert row["dice"] == pytest.approx(np.mean(dices), abs=1e-9)
    assert row["iou"] == pytest.approx(np.mean(ious), abs=1e-9)
    # The masks are non-trivial (the decisive head makes about half the pixels foreground), so an
    # agreement of 1 is not the empty-mask-agrees-with-empty-mask artefact.
    assert 0.1 < float((probs > 0.5).mean()) < 0.9


def test_report_json_validates_and_schema_rejects_broken(torch_report, tmp_path):
    import jsonschema

    report = json.loads(json.dumps(torch_report))  # what a file round trip gives
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)
    assert report["schema"] == SCHEMA_VERSION
    assert report["machine"]["cpu"]["cores"] >= 1 and "torch" in report["machine"]["versions"]
    broken_ok = copy.deepcopy(report)
    ok_row = next(r for r in broken_ok["rows"] if r["status"] == "ok")
    ok_row["latency"] = []  # an ok row without timings
    with pytest.raises(DataError, match="latency"):
        validate_report(broken_ok, source="x.json")
    broken_skip = copy.deepcopy(report)
    skipped = next(r for r in broken_skip["rows"] if r["status"] == "skipped")
    skipped["reason"] = ""  # a skipped row must say why
    with pytest.raises(DataError, match="x.json"):
        validate_report(broken_skip, source="x.json")


def _planted(name: str, prepare) -> FormatSpec:
    return FormatSpec(name, "fp32", "torch", "planted", lambda ctx: None, prepare)


def test_planted_failures_do_not_stop_the_others(site, monkeypatch):
    def raises(ctx):
        raise RuntimeError("planted breakage")

    def inverted(ctx):
        # Runs fine but predicts 1 - p: its masks disagree with the reference.
        base = fmt._fused_eager(None)(ctx)
        return Prepared(lambda x: 1.0 - base.infer(x), base.to_input, base.to_numpy, 1)

    def hangs(ctx):
        base = fmt._fused_eager(None)(ctx)

        def slow(x):
            time.sleep(30)
            return base.infer(x)

        return Prepared(slow, base.to_input, base.to_numpy, 1)

    registry = {
        "eager-2model": FORMATS["eager-2model"],
        "fused-fp32": _planted("fused-fp32", raises),
        "fused-bf16": FORMATS["fused-bf16"],
        "onnx-fp32": _planted("onnx-fp32", inverted),
        "onnx-fp16": _planted("onnx-fp16", hangs),
        "coreml-fp16": FORMATS["coreml-fp16"],
    }
    monkeypatch.setattr(fmt, "FORMATS", registry)
    t0 = time.perf_counter()
    report = run_benchmark(_options(site, list(registry), format_timeout_s=3.0))
    assert time.perf_counter() - t0 < 25, "the hanging format was not cut off"
    rows = {r["format"]: r for r in report["rows"]}
    assert list(rows) == list(registry)
    assert rows["fused-fp32"]["status"] == "failed" and "planted breakage" in rows["fused-fp32"]["reason"]
    assert rows["onnx-fp32"]["status"] == "failed" and "agreement" in rows["onnx-fp32"]["reason"]
    assert rows["onnx-fp32"]["agreement_dice"] < 0.5
    assert rows["onnx-fp16"]["status"] == "failed" and "timed out" in rows["onnx-fp16"]["reason"]
    assert rows["eager-2model"]["status"] == "ok"
    assert rows["fused-bf16"]["status"] == ("ok" if native_bf16_cpu() else "skipped")
    assert rows["coreml-fp16"]["status"] == ("skipped" if platform.system() != "Darwin" else rows["coreml-fp16"]["status"])
    validate_report(report)


@pytest.mark.slow
def test_onnx_and_compile_rows_ok(site):
    """The exported formats (ONNX export, fp16 conversion, int8 calibration: slow) and the
    torch.compile rows. The compile rows trace with the aot_eager backend: the same dynamo
    capture, autocast and per-batch recompilation as inductor, without its C++ code generation,
    which costs minutes of CPU on 2 cores (benchmarks/notes/benchmark.md runs inductor)."""
    names = ["onnx-fp32", "onnx-fp16", "onnx-int8", "compile-fp32", "compile-bf16"]
    report = run_benchmark(_options(site, names, compile_backend="aot_eager"))
    assert [r["format"] for r in report["rows"]] == [n for n in FORMATS if n in names]  # registry order
    _check_rows(report)
    sizes = {r["format"]: r["artifact_bytes"] for r in report["rows"] if r["status"] == "ok"}
    # Reduced-precision artifacts are smaller: fp16 weights are half of fp32, int8 a quarter (+ scales).
    assert sizes["onnx-fp16"] < 0.7 * sizes["onnx-fp32"]
    assert sizes["onnx-int8"] < 0.6 * sizes["onnx-fp32"]


# ---------------------------------------------------------------------------------------------
# compare


def _hand_report(device_name: str, rows: list[tuple[str, str, dict[int, float]]], *, gflops: float = 100.0,
                 matmul: dict | None = None, tf32: bool = False) -> dict:
    gpu = {"name": device_name, "driver": "1", "tf32_cudnn": tf32, "tf32_matmul": False} if "NVIDIA" in device_name else None
    return {
        "schema": SCHEMA_VERSION,
        "created": "2026-11-26T00:00:00+00:00",
        "command": "hand-written",
        "machine": {
            "cpu": {"model": "test cpu", "cores": 2, "flags": []},
            "gpu": gpu,
            "versions": {"torch": "x"},
            "device": "cuda" if gpu else "cpu",
            "device_name": device_name,
            **({"matmul_gflops": matmul} if matmul else {}),
        },
        "model": {"preset": "paper", "img_size": 224, "gflops_per_frame": gflops, "params": 1, "fusion": {}},
        "data": {"source": "random", "frames": 4},
        "settings": {"batches": [1, 32], "runs": 5, "warmup": 1},
        "rows": [
            {
                "format": name, "precision": precision, "engine": "torch", "device": "x", "status": "ok", "reason": "",
                "latency": [{"batch": b, "p50_ms": 1000.0 * b / f, "p95_ms": 1000.0 * b / f, "fps": f, "runs": 5} for b, f in fps.items()],
            }
            for name, precision, fps in rows
        ],
    }


def test_compare_ratios_floor_and_fraction(tmp_path):
    cpu = _hand_report("Intel Xeon", [("eager-2model", "fp32", {1: 2.0}), ("fused-bf16", "bf16", {1: 5.0})],
                       matmul={"fp32": 250.0, "bf16": 800.0})
    h100 = _hand_report("NVIDIA H100 80GB HBM3", [("eager-2model", "fp32", {1: 50.0, 32: 400.0}), ("fused-bf16", "bf16", {1: 300.0, 32: 2500.0})])
    paths = []
    for name, rep in (("cpu", cpu), ("h100", h100)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    from pocus_edge.benchmark.compare import load_report

    comparison = compare_reports([load_report(p) for p in paths], labels=["cpu", "h100"])
    cells = {(r["format"], r["batch"]): r["cells"] for r in comparison["rows"]}
    assert cells[("eager-2model", 1)][1]["ratio"] == pytest.approx(25.0)
    assert cells[("fused-bf16", 1)][1]["ratio"] == pytest.approx(60.0)
    assert cells[("fused-bf16", 1)][0]["ratio"] == pytest.approx(1.0)
    # batch 32 exists only on the H100: no reference, no ratio, but a floor.
    assert cells[("fused-bf16", 32)][0]["fps"] is None and cells[("fused-bf16", 32)][1]["ratio"] is None
    # H100 SXM dense bf16 = 1979/2 TFLOP/s: floor = 100 GFLOP / 989.5 TFLOP/s; fraction = fps * floor.
    floor = 100.0 / 989.5e3 * 1e3
    assert cells[("fused-bf16", 1)][1]["floor_ms"] == pytest.approx(floor)
    assert cells[("fused-bf16", 1)][1]["fraction_of_peak"] == pytest.approx(300.0 * floor / 1e3)
    # fp32 with TF32 off: the CUDA-core rate (67 TFLOP/s) bounds it.
    assert cells[("eager-2model", 1)][1]["floor_ms"] == pytest.approx(100.0 / 67e3 * 1e3)
    # An unknown CPU uses its own measured matmul rate.
    assert cells[("fused-bf16", 1)][0]["floor_ms"] == pytest.approx(100.0 / 800.0 * 1e3)
    assert comparison["machines"][1]["known_device"] == "NVIDIA H100 SXM"
    assert comparison["machines"][0]["known_device"] is None


def test_compare_cli_and_bad_input(tmp_path, capsys):
    from pocus_edge.cli import main

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_hand_report("Intel Xeon", [("fused-fp32", "fp32", {1: 4.0})])))
    b.write_text(json.dumps(_hand_report("NVIDIA L40S", [("fused-fp32", "fp32", {1: 30.0})], tf32=True)))
    out = tmp_path / "cmp.json"
    assert main(["benchmark", "compare", str(a), str(b), "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7.50x" in printed and "NVIDIA L40S" in printed
    saved = json.loads(out.read_text())
    # TF32 on: the L40S tensor-core TF32 rate (183 TFLOP/s dense) bounds the fp32 row.
    assert saved["rows"][0]["cells"][1]["floor_ms"] == pytest.approx(100.0 / 183e3 * 1e3)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    assert main(["benchmark", "compare", str(a), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and len(err.strip().splitlines()) == 1
    assert main(["benchmark", "--runs", "1"]) == 2  # neither checkpoints nor a preset
    assert "--preset" in capsys.readouterr().err


def test_fold_weight_standardization_is_exact():
    """The folded copy (plain Conv2d with the standardized weight) computes the same function as
    the StdConv2d original, has no StdConv2d left, and leaves the original untouched."""
    from timm.layers import StdConv2d

    from pocus_edge.config import model_preset
    from pocus_edge.models.fused import FusedSegmenter
    from pocus_edge.models.transunet import TransUNet

    torch.manual_seed(0)
    cfg = model_preset("tiny")
    fused = FusedSegmenter(TransUNet(cfg), TransUNet(cfg)).eval()
    copy_ = fmt.inference_copy(fused, None, channels_last=False)
    assert not any(isinstance(m, StdConv2d) for m in copy_.modules())
    assert sum(isinstance(m, StdConv2d) for m in fused.modules()) > 0
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        logits_original = fused.generative(x)
        logits_folded = copy_.generative(x)
    assert torch.allclose(logits_folded, logits_original, atol=1e-5, rtol=1e-4)
    bf16 = fmt.inference_copy(fused, torch.bfloat16, channels_last=True)
    convs = [m for m in bf16.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in bf16.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)


def test_devices_table_is_dense_and_matches_names():
    devices = load_devices()
    names = {d["name"] for d in devices}
    for wanted in ("NVIDIA L40S", "NVIDIA H100 SXM", "NVIDIA H200 SXM", "NVIDIA Jetson AGX Orin 64GB",
                   "NVIDIA Jetson Orin Nano 8GB", "Apple A17 Pro Neural Engine"):
        assert wanted in names
    for d in devices:
        assert d["source"].strip() and all(v > 0 for v in d["peak"].values())
        if d["name"].startswith("NVIDIA"):
            # Dense tensor-core rates on Ampere/Ada/Hopper: bf16 == fp16 and int8 == 2 x fp16.
            # A sparsity-inflated figure mixed in (2x) breaks one of these equalities.
            peak = d["peak"]
            assert peak["bf16"] == pytest.approx(peak["fp16"])
            assert peak["int8"] == pytest.approx(2 * peak["fp16"], rel=0.03)  # L40S: 733 vs 2 x 362.05
            assert peak["fp32"] < peak["fp16"]
    assert match_device("NVIDIA H100 80GB HBM3")["name"] == "NVIDIA H100 SXM"
    assert match_device("NVIDIA H100 PCIe")["name"] == "NVIDIA H100 PCIe"
    assert match_device("NVIDIA H200")["name"] == "NVIDIA H200 SXM"
    assert match_device("Orin")["name"] == "NVIDIA Jetson AGX Orin 64GB"
    assert match_device("Jetson Orin Nano Super")["name"] == "NVIDIA Jetson Orin Nano 8GB Super"
    assert match_device("Intel(R) Xeon(R) Processor") is None


def test_paper_gflops_match_flop_counter():
    """The GFLOPs the tool reports for the paper preset vs an independent FlopCounterMode count of
    the two branches on the meta device (no arithmetic runs), within 2%; and docs/method.md's 58.3
    GFLOPs per branch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pocus_edge.config import model_preset
    from pocus_edge.models.fused import FusedSegmenter
    from pocus_edge.models.transunet import TransUNet

    cfg = model_preset("paper")
    with torch.device("meta"):  # shapes only: building and running 2 x 105 M parameters is not needed
        reported = runner.gflops_per_frame(FusedSegmenter(TransUNet(cfg), TransUNet(cfg)).eval())
        branch = TransUNet(cfg).eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        branch(x)
    independent = 2 * counter.get_total_flops() / 1e9
    assert reported == pytest.approx(independent, rel=0.02)
    assert reported == pytest.approx(2 * 58.3, rel=0.02)
    # ... and the models issue's figure (`pocus-edge flops`).
    from pocus_edge.models.flops import model_report

    assert reported == pytest.approx(model_report("paper")["fused"]["gflops"], rel=0.02)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_draws_the_reported_fps_speedups_and_agreement(tmp_path):
    import matplotlib.patches

    from pocus_edge.benchmark.plot import plot_reports

    cpu = _hand_report("Intel Xeon", [("eager-2model", "fp32", {1: 2.0}), ("fused-bf16", "bf16", {1: 5.0}),
                                      ("onnx-int8", "int8", {32: 9.0})])
    cpu["rows"][1].update(agreement_dice=0.981, agreement_bar=0.95)
    cpu["rows"].append({"format": "tensorrt-fp16", "precision": "fp16", "engine": "tensorrt", "device": "x",
                        "status": "skipped", "reason": "no tensorrt", "latency": []})
    gpu = _hand_report("NVIDIA H100 80GB HBM3", [("eager-2model", "fp32", {1: 40.0}), ("fused-bf16", "bf16", {1: 300.0})])
    out = tmp_path / "fig.png"
    fig, data = plot_reports([cpu, gpu], ["cpu", "h100"], out, batch=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # onnx-int8 has no batch-1 figure: not drawn; the skipped row is listed, not drawn.
    assert data["formats"] == ["eager-2model", "fused-bf16"]
    assert data["series"][0]["speedup"]["fused-bf16"] == pytest.approx(2.5)
    assert data["series"][1]["speedup"]["fused-bf16"] == pytest.approx(7.5)
    assert data["series"][0]["not_ok"] == [("tensorrt-fp16", "skipped", "no tensorrt")]
    ax_fps, ax_agree = fig.axes[:2]
    widths = sorted(p.get_width() for p in ax_fps.patches if isinstance(p, matplotlib.patches.Rectangle))
    assert widths == pytest.approx([2.0, 5.0, 40.0, 300.0])
    labels = {t.get_text().strip() for t in ax_fps.texts}
    assert {"1.00x", "2.50x", "7.50x"} <= labels
    points = np.concatenate([c.get_offsets() for c in ax_agree.collections])
    assert points[:, 0].tolist() == pytest.approx([0.981])
    with pytest.raises(DataError, match="batch 8"):
        plot_reports([cpu], ["cpu"], tmp_path / "none.png", batch=8)
    assert not (tmp_path / "none.png").exists()


def test_plot_cli(tmp_path, capsys):
    from pocus_edge.cli import main

    a = tmp_path / "a.json"
    a.write_text(json.dumps(_hand_report("Intel Xeon", [("eager-2model", "fp32", {1: 2.0})])))
    assert main(["benchmark", "plot", str(a), "--out", str(tmp_path / "f.svg")]) == 0
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert "1 formats x 1 report(s)" in capsys.readouterr().out
    assert main(["benchmark", "plot", str(a), "--batch", "4", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "batch 4" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# OpenVINO rows, fraction of peak, machine description


@pytest.mark.slow
def test_openvino_rows_and_fraction_of_peak(site):
    """OpenVINO rows built by export_model from the shared table reach their agreement bars, and
    every timed batch reports achieved GFLOP/s over this run's measured peak for its precision."""
    pytest.importorskip("openvino")
    names = ["openvino-fp32", "openvino-bf16", "openvino-int8"]
    report = run_benchmark(_options(site, names, probe=True))
    assert [r["format"] for r in report["rows"]] == names
    _check_rows(report)
    peaks = report["machine"]["matmul_gflops"]
    assert peaks["fp32"] > 0 and peaks["int8"] > 0
    for row in report["rows"]:
        for lat in row["latency"]:
            assert lat["fraction_of_peak"] == pytest.approx(lat["fps"] * row["gflops_per_frame"] / peaks[row["precision"]])
    ok = {r["format"]: r for r in report["rows"] if r["status"] == "ok"}
    assert ok["openvino-int8"]["artifact_bytes"] < 0.8 * ok["openvino-fp32"]["artifact_bytes"]


def test_machine_description_leaves_the_hostname_out_unless_asked():
    import platform

    from pocus_edge.benchmark.machine import describe_machine, parse_nvpmodel

    assert "hostname" not in describe_machine()
    assert describe_machine(hostname=True)["hostname"] == platform.node()
    assert parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2\n") == {"name": "MAXN_SUPER", "id": 2}
    assert parse_nvpmodel("") is None


def test_annotate_peak_fraction_follows_its_formula():
    machine = {"matmul_gflops": {"bf16": 800.0}}
    row = {"precision": "bf16", "gflops_per_frame": 100.0, "latency": [{"batch": 1, "fps": 2.0}, {"batch": 8, "fps": 4.0}]}
    runner.annotate_peak_fraction(row, machine)
    assert [lat["fraction_of_peak"] for lat in row["latency"]] == pytest.approx([0.25, 0.5])
    unknown = {"precision": "int8", "gflops_per_frame": 100.0, "latency": [{"batch": 1, "fps": 2.0}]}
    runner.annotate_peak_fraction(unknown, machine)
    assert "fraction_of_peak" not in unknown["latency"][0]  # no int8 peak measured: no fraction


@pytest.mark.parametrize("options, message", [
    (dict(preset="tiny", formats=["onnx-fp99"]), "unknown format"),
    (dict(preset="nosuchpreset"), "unknown preset 'nosuchpreset'"),
    (dict(preset="tiny", students=("nosuchnet",)), "unknown student 'nosuchnet'"),
    (dict(preset="tiny", students=("mobilenetv3",), student_preset="nosuchpreset"), "unknown preset 'nosuchpreset'"),
])
def test_choices_are_refused_before_any_model_is_built(monkeypatch, options, message):
    from pocus_edge.errors import ConfigError

    def no_setup(*args, **kwargs):
        raise AssertionError("a model was built before the choices were checked")

    monkeypatch.setattr(runner, "_model_setups", no_setup)
    monkeypatch.setattr(runner, "_resolve_device", no_setup)
    with pytest.raises(ConfigError, match=message):
        run_benchmark(BenchmarkOptions(batches=(1,), runs=1, **options))
