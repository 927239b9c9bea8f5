"""The models ``qualify`` scores, and one way to run each.

A :class:`ModelSpec` is one model: a single network (one checkpoint, or an ONNX graph with a
``prob`` output), a fused pair of checkpoints (the entropy fusion with per-image normalization, as
``export`` and the study build it), or a fused ONNX export with its branch outputs
(``--branches``: ``fused``, ``p_generative``, ``p_contrastive``, ...). A study folder expands to
every finished model of the study (:func:`study_models`). Networks are cached by file, so a study's
fused arm reuses the predictions of the branch runs it fuses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CheckpointError, ConfigError, DataError, ExportError

BRANCH_OUTPUTS = ("p_generative", "p_contrastive")


@dataclass(frozen=True)
class ModelSpec:
    """One model to qualify. ``kind``: ``single`` (paths: one checkpoint), ``pair`` (generative,
    contrastive checkpoints), ``onnx`` (one exported graph). ``arm``/``seed``: where a study's
    model comes from (None otherwise)."""

    name: str
    kind: str
    paths: tuple[Path, ...]
    arm: str | None = None
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def two_branch(self) -> bool:
        return self.kind == "pair" or bool(self.info.get("branches"))


# ---------------------------------------------------------------------------------------------
# Networks


class _Network:
    """One checkpoint (torch) or ONNX graph; ``predict`` returns named probability maps (N, S, S)."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            from ..inference import open_backend

            self.backend = open_backend(self.path, "ort", device="cpu")
            self.img_size = int(self.backend.img_size)
            self.names = list(self.backend.output_names)
            self.preset = (self.backend.card or {}).get("preset")
            self.net = None
        else:
            from ..models.weights import build_segmenter

            self.net, card = build_segmenter(self.path, device=device)
            if card.get("out_channels", 1) != 1:
                raise CheckpointError(f"{self.path}: has {card.get('out_channels')} output channels; qualify scores "
                                      "1-channel segmenters")
            self.img_size = int(self.net.cfg.img_size)
            self.preset = card.get("preset")
            self.names = ["prob"]
            self.device = device

    def predict(self, gray: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
        """``gray`` float32 (N, S, S) in [0, 1] -> {output name: (N, S, S) float32}."""
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(gray), batch):
            x = np.repeat(gray[start : start + batch, None], 3, axis=1)
            for k, v in self._run(np.ascontiguousarray(x, np.float32)).items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.net is None:
            b = self.backend
            feed = x
            if b.input_dtype == "uint8":
                feed = np.clip(np.rint(x[:, :1] * 255.0), 0, 255).astype(np.uint8)
            elif b.input_dtype == "float16":
                feed = x.astype(np.float16)
            outs = []
            step = b.max_batch or len(feed)
            for i in range(0, len(feed), step):
                outs.append(b.session.run(None, {b.input_name: feed[i : i + step]}))
            return {n: np.concatenate([o[j] for o in outs]).astype(np.float32)[:, 0] for j, n in enumerate(self.names)
                    if np.ndim(outs[0][j]) == 4}
        import torch

        with torch.no_grad():
            p = self.net.predict(torch.from_numpy(x).to(self.device))
        return {"prob": p.float().cpu().numpy()[:, 0]}


class NetworkCache:
    """Opened networks and their outputs on one frame set, by file (a few at a time)."""

    def __init__(self, device: str = "cpu", keep: int = 4):
        self.device = device
        self.keep = keep
        self._nets: dict[Path, _Network] = {}
        self._outputs: OrderedDict[tuple[Path, str], dict[str, np.ndarray]] = OrderedDict()

    def network(self, path: Path) -> _Network:
        path = Path(path)
        if path not in self._nets:
            self._nets[path] = _Network(path, self.device)
        return self._nets[path]

    def outputs(self, path: Path, key: str, gray: np.ndarray) -> dict[str, np.ndarray]:
        """The network's outputs on ``gray`` (cached under ``key``: a frame set and a perturbation)."""
        k = (Path(path), key)
        if k in self._outputs:
            self._outputs.move_to_end(k)
            return self._outputs[k]
        out = {n: v.astype(np.float16) for n, v in self.network(path).predict(gray).items()}
        self._outputs[k] = out
        while len(self._outputs) > self.keep * 16:
            self._outputs.popitem(last=False)
        return out


def model_outputs(spec: ModelSpec, cache: NetworkCache, key: str, gray: np.ndarray
                  ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(fused or single probability (N, S, S), (p_generative, p_contrastive) or None)."""
    if spec.kind == "pair":
        import torch

        from ..models.fusion import fuse

        g = cache.outputs(spec.paths[0], key, gray)["prob"].astype(np.float32)
        c = cache.outputs(spec.paths[1], key, gray)["prob"].astype(np.float32)
        fused = fuse(torch.from_numpy(g)[:, None], torch.from_numpy(c)[:, None], method="entropy", norm="image")
        return fused.numpy()[:, 0], (g, c)
    out = cache.outputs(spec.paths[0], key, gray)
    if spec.kind == "onnx" and spec.info.get("branches"):
        return out["fused"].astype(np.float32), (out["p_generative"].astype(np.float32),
                                                  out["p_contrastive"].astype(np.float32))
    prob = out.get("prob", out.get("fused"))
    return prob.astype(np.float32), None


# ---------------------------------------------------------------------------------------------
# Resolving what the user named


def check_models(specs: Sequence[ModelSpec], cache: NetworkCache) -> int:
    """Open every model once; refuse mixed input sizes and ONNX graphs that lack the outputs a
    score needs (one line naming the file). Returns the common input size."""
    if not specs:
        raise ConfigError("qualify needs at least one model (a checkpoint, -g/-c pair, ONNX export or study folder)")
    first: tuple[Path, int, Any] | None = None
    for spec in specs:
        for path in spec.paths:
            net = cache.network(path)
            if spec.kind == "onnx":
                _check_onnx_outputs(path, net.names, spec)
            if first is None:
                first = (path, net.img_size, net.preset)
            elif net.img_size != first[1]:
                raise CheckpointError(
                    f"{path}: preset {net.preset or '?'} ({net.img_size} px) differs from {first[0]}'s preset "
                    f"{first[2] or '?'} ({first[1]} px); qualify compares models made at one input size")
    assert first is not None
    return first[1]


def _check_onnx_outputs(path: Path, names: list[str], spec: ModelSpec) -> None:
    if "fused" in names:
        missing = [n for n in BRANCH_OUTPUTS if n not in names]
        if missing:
            raise ExportError(f"{path}: fused ONNX export without the branch output(s) {', '.join(missing)} that the "
                              "branch-agreement risk needs; export it again with --branches")
        spec.info["branches"] = True
    elif "prob" not in names and len(names) != 1:
        raise ExportError(f"{path}: no 'fused' or 'prob' output (outputs: {', '.join(names)}); not a segmenter export")


def resolve_models(items: Sequence[Path], generative: Sequence[Path] = (), contrastive: Sequence[Path] = ()
                   ) -> tuple[list[ModelSpec], list[Path]]:
    """Specs of the MODEL arguments (checkpoints, ONNX exports; study folders are returned apart)
    and of the ``-g``/``-c`` pairs (paired in order)."""
    if len(generative) != len(contrastive):
        raise ConfigError(f"-g/--generative given {len(generative)} time(s) but -c/--contrastive {len(contrastive)}: "
                          "give them in pairs")
    specs: list[ModelSpec] = []
    studies: list[Path] = []
    taken: set[str] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            studies.append(p)
        elif not p.is_file():
            raise DataError(f"{p}: no such model file or study folder")
        elif p.suffix == ".onnx":
            specs.append(ModelSpec(_name(p, taken), "onnx", (p,)))
        elif p.suffix == ".safetensors":
            specs.append(ModelSpec(_name(p, taken), "single", (p,)))
        else:
            raise CheckpointError(f"{p}: not a checkpoint (.safetensors), ONNX export (.onnx) or study folder")
    for g, c in zip(generative, contrastive):
        for p in (g, c):
            if not Path(p).is_file():
                raise DataError(f"{p}: no such checkpoint")
        specs.append(ModelSpec(_name(Path(g), taken, prefix="fused-"), "pair", (Path(g), Path(c))))
    return specs, studies


def _name(path: Path, taken: set[str], prefix: str = "") -> str:
    from ..train.evaluate import model_name

    return model_name(path, taken) if not prefix else model_name(path.parent / f"{prefix}{_stem(path)}.x", taken)


def _stem(path: Path) -> str:
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


# ---------------------------------------------------------------------------------------------
# Study folders


def _resolve_in(study_dir: Path, recorded: str | None, out: str | None) -> Path | None:
    """A path recorded in a study (relative to the directory the study ran from) as a path here."""
    if not recorded:
        return None
    p = Path(recorded)
    if p.is_absolute() or p.exists():
        return p
    base = study_dir.resolve()
    if out and not Path(out).is_absolute():
        parts = Path(out).parts
        if base.parts[-len(parts):] == parts:
            base = Path(*base.parts[: -len(parts)])
    return base / p


def read_study(study_dir: Path) -> dict[str, Any]:
    """The options a study folder recorded (``study_config.yaml``), with its sites resolved."""
    import yaml

    from ..study.budgets import CONFIG

    path = Path(study_dir) / CONFIG
    if not path.is_file():
        raise DataError(f"{study_dir}: not a study folder (no {CONFIG}) and not a model file")
    try:
        options = (yaml.safe_load(path.read_text()) or {}).get("options") or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    out = options.get("out")
    return {**options, "source": _resolve_in(study_dir, options.get("source"), out),
            "target": _resolve_in(study_dir, options.get("target"), out), "folder": Path(study_dir)}


def _run_model(run_folder: Path) -> Path | None:
    from ..study.markers import read_done

    info = read_done(run_folder)
    if not info or not info.get("model"):
        return None
    p = Path(info["model"])
    for candidate in (p, run_folder / "train" / p.name, run_folder / p.name):
        if candidate.is_file():
            return candidate
    return None


def study_models(study_dir: Path) -> tuple[list[ModelSpec], dict[str, Any]]:
    """Every finished model of a study: each arm's run per seed (its checkpoint), and each fused
    arm's fusion of its two branch runs (same recipe and seed), seed by seed so that a fused arm
    follows the branch runs it reuses."""
    from ..study.arms import ARMS, parse_arms

    options = read_study(study_dir)
    seeds = int(options.get("seeds", 1))
    first = int(options.get("first_seed", 0))
    try:
        # An arm registered by a plugin that is not loaded here cannot be rebuilt: skip it.
        known = [a for a in (options.get("arms") or ()) if str(a).partition("@")[0].partition(":")[0] in ARMS]
        choices = parse_arms(known, options.get("recipe", "default"), seeds)
    except ConfigError as exc:
        raise DataError(f"{study_dir}: {exc}") from None
    runs = Path(study_dir) / "runs"
    specs: list[ModelSpec] = []
    for seed in range(first, first + seeds):
        for choice in choices:
            if seed - first >= choice.seeds:
                continue
            kind = ARMS[choice.arm]
            folder = lambda arm: runs / f"{arm}@{choice.recipe}" / f"seed{seed}"  # noqa: E731
            name = f"{choice.key}/seed{seed}"
            if kind.train is None and len(kind.needs) == 2:
                pair = [_run_model(folder(arm)) for arm in kind.needs]
                if all(pair):
                    specs.append(ModelSpec(name, "pair", tuple(pair), arm=choice.key, seed=seed))  # type: ignore[arg-type]
            else:
                model = _run_model(folder(choice.arm))
                if model is not None:
                    specs.append(ModelSpec(name, "single", (model,), arm=choice.key, seed=seed))
    if not specs:
        raise DataError(f"{study_dir}: study folder with no finished runs (no runs/ARM@RECIPE/seedS/done.json naming "
                        "a model)")
    return specs, options


Progress = Callable[[int], None]
