"""The time estimate of a study: optimizer steps and a forward pass timed on this machine, times
the planned steps of every unit not yet finished."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .budgets import Budget

if TYPE_CHECKING:
    from .folder import Study
    from .plan import Unit


@dataclass
class Pace:
    """Seconds per optimizer step of each stage kind and per evaluated arm, measured here."""

    step_s: dict[str, float]
    forward_s_per_frame: float
    eval_s: float

    def stage_seconds(self, kind: str, budget: Budget) -> float:
        steps, _ = budget.steps(kind)
        seconds = steps * self.step_s.get(kind, 0.0)
        if kind in ("finetune", "distill") and budget.val_frames:
            seconds += 8 * budget.val_frames * self.forward_s_per_frame  # ~8 validations per run
        return seconds


def measure_pace(study: Study, repeats: int = 3) -> Pace:
    """Time a few optimizer steps of each stage kind on random inputs of the planned batch sizes
    (after one warm-up step) and a forward pass; no data is read. The fastest repeat is kept: on a
    busy machine it is the closest to what an idle one gives."""
    import torch

    from ..config import model_preset
    from ..models.heads import ContrastiveModel, MIMModel
    from ..models.transunet import TransUNet
    from ..train.common import stage_defaults
    from ..train.mim import resolve_mask_cell

    cfg = model_preset(study.options.preset)
    size, dev = cfg.img_size, study.device
    step_s: dict[str, float] = {}
    for kind in ("mim", "contrastive", "finetune"):
        _, batch = study.budget.steps(kind)
        torch.manual_seed(0)
        if kind == "mim":
            model = MIMModel(cfg, resolve_mask_cell(size, stage_defaults("mim", study.options.preset))).to(dev)
            x = torch.rand(batch, 3, size, size, device=dev)
            mask, speckle = model.mask_generator(batch, device=dev)
            loss_of = lambda: model(x, mask, speckle)[0]  # noqa: E731
        elif kind == "contrastive":
            model = ContrastiveModel(cfg).to(dev)
            x = torch.rand(2 * batch, 3, size, size, device=dev)
            loss_of = lambda: model(x).sum()  # noqa: E731
        else:
            model = TransUNet(cfg).to(dev)
            x = torch.rand(batch, 3, size, size, device=dev)
            loss_of = lambda: model(x).sigmoid().mean()  # noqa: E731
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_of().backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s[kind] = float(min(times[1:]))
    # A distillation step (the student on target + source frames, the teacher cached) is priced
    # like a fine-tuning step.
    step_s["distill"] = step_s["finetune"]
    net = TransUNet(cfg).to(dev).eval()
    x = torch.rand(32, 3, size, size, device=dev)
    with torch.no_grad():
        net(x)
        forward = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            forward = min(forward, (time.perf_counter() - t0) / 32)
    frames = len(study.target_site.select("test", labeled=True)) + (study.budget.val_frames or 256)
    # Boundary metrics cost about as much as the forward pass on small frames.
    return Pace(step_s, forward, frames * forward * 2.0 + 2.0)


def format_estimate(units: list[Unit], pace: Pace) -> str:
    todo = [u for u in units if not u.finished()]
    by_kind: dict[str, list[Unit]] = {}
    for u in todo:
        by_kind.setdefault(u.kind, []).append(u)
    lines = [f"measured here: {', '.join(f'{k} {v * 1000:.0f} ms/step' for k, v in pace.step_s.items())}, "
             f"forward {pace.forward_s_per_frame * 1000:.1f} ms/frame"]
    for kind, group in by_kind.items():
        lines.append(f"  {len(group):3d} {kind} unit(s): ~{sum(u.cost_s for u in group) / 60:.0f} min")
    total = sum(u.cost_s for u in todo)
    skipped = len(units) - len(todo)
    lines.append(f"estimate: ~{total / 3600:.1f} h on this machine if it is otherwise idle"
                 + (f" ({skipped} finished unit(s) skipped)" if skipped else ""))
    return "\n".join(lines)
