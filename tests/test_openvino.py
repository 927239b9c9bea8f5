"""OpenVINO as an export target and a runtime backend: fp32, bf16 (where the CPU has native
bf16) and NNCF int8 calibrated on unlabeled target frames with the fusion kept fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pocus_edge.benchmark.machine import native_bf16_cpu
from pocus_edge.config import model_preset
from pocus_edge.export import parity as parity_mod
from pocus_edge.export.parity import spread_head_logits
from pocus_edge.models.fused import FusedSegmenter
from pocus_edge.models.transunet import TransUNet

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def fused():
    cfg = model_preset("tiny")
    torch.manual_seed(0)
    g, c = TransUNet(cfg).eval(), TransUNet(cfg).eval()
    frames, _ = parity_mod.parity_frames(None, cfg.img_size, n=4, seed=99)
    spread_head_logits(g, frames)
    spread_head_logits(c, frames)
    return FusedSegmenter(g, c).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_openvino_export_runs_in_the_backend_and_meets_its_bar(fused, tiny_sites, tmp_path, precision):
    from pocus_edge.card import CARD_KEY
    from pocus_edge.export.api import ExportOptions, export_model
    from pocus_edge.inference import OPENVINO_HINTS, open_backend

    if precision == "bf16" and not native_bf16_cpu():
        pytest.skip("this CPU has no native bf16 (OpenVINO would emulate it)")
    if precision == "int8":
        pytest.importorskip("nncf")
    _, target = tiny_sites
    out = tmp_path / f"fused-{precision}.xml"
    result = export_model(fused, out, ExportOptions(target="openvino", precision=precision, calib=target,
                                                    calib_frames=16, parity_frames=6, batch=None))
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert result.parity["passed"] and result.parity["backend"] == "openvino"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = ov.Core().read_model(str(out))
    card = json.loads(model.get_rt_info([CARD_KEY]).astype(str))
    assert card["precision"] == precision and card["fusion"] == fused.fusion_settings and card["gflops_per_frame"] > 0
    backend = open_backend(out)
    assert backend.name == "openvino" and backend.precision == precision
    assert backend.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == OPENVINO_HINTS[precision]
    assert backend.gflops_per_frame == pytest.approx(card["gflops_per_frame"])
    x = parity_mod.parity_frames(target, 64, n=6)[0]
    with torch.no_grad():
        reference = fused(torch.from_numpy(x)).numpy()
    got = backend.infer(x)
    dice = parity_mod.dice_per_image(got > 0.5, reference > 0.5).mean()
    bar = {"fp32": 0.999, "bf16": 0.95, "int8": 0.95}[precision]
    assert dice >= bar, dice
    if precision == "fp32":
        assert np.abs(got - reference).max() < 1e-3
    else:
        assert np.abs(got - reference).max() > 1e-5  # really another precision
    if precision == "int8":
        from pocus_edge.export.openvino import fp32_scope

        ops = model.get_ordered_ops()
        fake_quant = [op for op in ops if op.get_type_name() == "FakeQuantize"]
        assert fake_quant, "NNCF inserted no quantizers"
        kept = set(fp32_scope(model))
        assert {op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"} <= kept
        for op in fake_quant:  # no quantizer feeds a sigmoid or anything after one
            for out_port in op.outputs():
                for target_input in out_port.get_target_inputs():
                    assert target_input.get_node().get_friendly_name() not in kept


def test_openvino_int8_without_calibration_is_refused(fused, tmp_path):
    from pocus_edge.errors import ExportError
    from pocus_edge.export.api import export_model

    with pytest.raises(ExportError, match="--calib"):
        export_model(fused, tmp_path / "f.xml", target="openvino", precision="int8")
    assert list(tmp_path.iterdir()) == []
