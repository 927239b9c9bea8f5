"""Run every artifact the Android app may load in the app's own onnxruntime and compare with the
golden vectors the current pipeline wrote (.ci/app_runtime_models.py).

    APP_VENV/bin/python .ci/app_runtime_checks.py OUT EXPECTED_ORT_VERSION

Runs in a venv holding only numpy and ``onnxruntime==`` the version of
android_demo/onnxruntime.version; reads the golden folders with pocus_edge's golden reader
(numpy only). Per artifact: the session opens, its model card is in the metadata, and on every
golden frame the probability is within MAX_DIFF of the current onnxruntime's and the
mask (``prob > threshold``) is identical except where the golden probability lies within that
bar of the threshold. Ends with "N passed, N failed"; non-zero exit on any failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pocus_edge.export.golden import mask_of, read_golden, read_npy

# Largest |prob - golden prob| between two onnxruntime versions, fp32 and int8 alike: their
# kernels differ in summation order only (students: < 1e-6; int8: identical). The fused graph
# normalizes each frame's confidences by their min-max range, which amplifies such differences
# where the range is narrow (2.4e-4 seen on a random-weight tiny fused graph).
MAX_DIFF = 1e-3
CARD_KEY = "pocus_edge_card"


def check_artifact(folder: Path, entry: dict) -> list[str]:
    """Failures of one artifact (empty: it passed)."""
    path = folder / entry["artifact"]
    golden_dir = folder / entry["golden"]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any refusal is the finding
        return [f"{path.name}: onnxruntime {ort.__version__} cannot load it ({str(exc).splitlines()[0][:200]})"]
    card = json.loads(session.get_modelmeta().custom_metadata_map.get(CARD_KEY, "null") or "null")
    if not isinstance(card, dict) or "img_size" not in card:
        return [f"{path.name}: no readable {CARD_KEY} in the metadata"]
    index = read_golden(golden_dir)
    threshold = np.float32(index["threshold"])
    size = index["input_size"]
    inp = session.get_inputs()[0]
    names = [o.name for o in session.get_outputs()]
    prob_name = next((n for n in ("fused", "prob") if n in names), names[0])
    bar = MAX_DIFF
    failures = []
    for case in index["cases"]:
        entry_at_size = next(e for e in case["sizes"] if e["size"] == size)
        if inp.type == "tensor(uint8)":
            x = read_npy(golden_dir / entry_at_size["gray"])[None, None]
        else:
            x = read_npy(golden_dir / entry_at_size["input"])[None]
        prob = session.run([prob_name], {inp.name: x})[0].reshape(size, size)
        expected = read_npy(golden_dir / case["prob"])
        diff = float(np.abs(prob - expected).max())
        if diff > bar:
            failures.append(f"{path.name} frame {case['id']}: max |prob - golden| {diff:.3g} > {bar:g}")
        settled = np.abs(expected - threshold) > bar
        wrong = (mask_of(prob, threshold) != read_npy(golden_dir / case["mask"])) & settled
        if wrong.any():
            failures.append(f"{path.name} frame {case['id']}: {int(wrong.sum())} mask pixels differ away from the threshold")
    return failures


def main(folder: Path, expected_version: str) -> int:
    passed = failed = 0
    if ort.__version__ != expected_version:
        print(f"FAIL onnxruntime here is {ort.__version__}, the app pins {expected_version}")
        failed += 1
    for entry in json.loads((folder / "artifacts.json").read_text()):
        failures = check_artifact(folder, entry)
        for line in failures:
            print(f"FAIL {line}")
        if failures:
            failed += 1
        else:
            passed += 1
            print(f"ok   {entry['artifact']} ({entry['precision']}) loads in onnxruntime {ort.__version__} and matches its golden vectors")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
