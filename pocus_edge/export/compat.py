"""What the oldest runtime that loads our graphs accepts: the Android app's onnxruntime.

The app (android_demo/) pins ``onnxruntime-android`` at the version in
``android_demo/onnxruntime.version``; every ONNX graph an export writes must load there, not only
in the onnxruntime this machine has. onnxruntime's compatibility table
(onnxruntime.ai/docs/reference/compatibility.html) gives, for 1.19: ONNX 1.16.1, opset 21,
ONNX-ML opset 4, IR version 10. ``make app-runtime-test`` loads the exported artifacts in that
exact onnxruntime and checks them against golden vectors; this module refuses, at export time,
a graph stamped newer than it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ExportError

APP_ONNXRUNTIME = "1.19.2"  # = android_demo/onnxruntime.version (a test keeps them equal)
MAX_IR_VERSION = 10
# Opset domain -> newest version that runtime implements ("" is the default ONNX domain).
MAX_OPSETS = {"": 21, "ai.onnx": 21, "ai.onnx.ml": 4, "com.microsoft": 1}


def app_runtime() -> str:
    return f"onnxruntime {APP_ONNXRUNTIME} (the Android app's)"


def check_opset(opset: int) -> None:
    """Refuse an ``--opset`` the app's onnxruntime does not implement."""
    if int(opset) > MAX_OPSETS[""]:
        raise ExportError(f"opset {opset} is newer than {app_runtime()} runs (opset <= {MAX_OPSETS['']}); pass --opset {MAX_OPSETS['']} or lower")


def used_domains(model_proto: Any) -> set[str]:
    """Opset domains the graph's nodes use (subgraphs included); the default domain always."""
    domains = {""}
    stack = [model_proto.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            domains.add(node.domain or "")
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)
    return domains


def app_runtime_issues(model_proto: Any) -> list[str]:
    """Why the app's onnxruntime would refuse this ModelProto (empty: it loads). Opset imports of
    domains no node uses (quantization tools add several) are ignored: onnxruntime never
    resolves them."""
    issues = []
    if model_proto.ir_version > MAX_IR_VERSION:
        issues.append(f"IR version {model_proto.ir_version} (at most {MAX_IR_VERSION})")
    used = used_domains(model_proto)
    for entry in model_proto.opset_import:
        domain = entry.domain or ""
        newest = MAX_OPSETS.get(domain)
        if domain in used and newest is not None and entry.version > newest:
            issues.append(f"{domain or 'ai.onnx'} opset {entry.version} (at most {newest})")
    return issues


def check_app_runtime(model_proto: Any, path: str | Path) -> None:
    """ExportError, one line naming the file, when the app's onnxruntime would not load it."""
    issues = app_runtime_issues(model_proto)
    if issues:
        raise ExportError(f"{path}: {app_runtime()} cannot load this graph: {', '.join(issues)}")
