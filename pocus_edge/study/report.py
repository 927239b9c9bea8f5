"""The report of a study (:mod:`pocus_edge.study`): ``study.md``, ``study.json`` and
``study.png`` from the seed-level statistics of :mod:`.stats`."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..io import write_bytes_atomic, write_json_atomic, write_text_atomic
from .arms import PRETRAININGS
from .markers import read_done, read_failed
from .scoring import collect
from .stats import ALPHA, CONVERGENCE_GAP, MIN_EFFECT, MIN_SEEDS, analyse

if TYPE_CHECKING:
    from .folder import Study


def _goal_text(value: Any) -> str:
    if value is True:
        return "met"
    if value is False or value == "NO":
        return "NOT met"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Writing


def _label(key: str, default_recipe: str) -> str:
    arm, _, recipe = key.partition("@")
    return arm if recipe == default_recipe else key


def _ci(ci: tuple[float, float] | list[float], digits: int = 3) -> str:
    low, high = ci
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]" if math.isfinite(low) else ""


def _plain_ci(ci, digits: int = 3) -> str:
    low, high = ci
    return f"[{low:.{digits}f}, {high:.{digits}f}]" if math.isfinite(low) else ""


def _v(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


def render_markdown(study: "Study", analysis: dict[str, Any], facts: dict[str, Any]) -> str:
    r = study.options.recipe
    arms, comps = analysis["arms"], analysis["comparisons"]
    lines = [
        f"# Study: {study.source_site.name} -> {study.target_site.name}",
        "",
        f"Preset `{study.options.preset}`, recipe `{r}`, budget `{study.budget.name}` (steps x global batch: MIM "
        f"{study.budget.mim[0]}x{study.budget.mim[1]}, contrastive {study.budget.contrastive[0]}x"
        f"{study.budget.contrastive[1]}, fine-tuning {study.budget.finetune[0]}x{study.budget.finetune[1]}), "
        f"{study.options.pretrain_seeds} pretraining run(s) per SSL method (seed s uses run s mod "
        f"{study.options.pretrain_seeds}), {len(analysis['patients'])} target test patients "
        f"({facts['test_frames']} labeled frames). Code {facts['code_version']}.",
        "",
        "The unit of replication is the training seed. Primary comparison, decided before the run: "
        f"**{_label(analysis['primary'], r)} vs its comparison arm**, exact sign-flip test over seeds at alpha "
        f"{ALPHA}, outside any family.",
        "",
    ]
    lines += _primary_lines(analysis, r)
    lines += [
        "## Target test, per arm",
        "",
        "Per seed: the mean over test patients; then mean and 95 % t-interval over seeds. *Patients only*: the "
        "interval when only the test patients are resampled (seeds fixed), which says how much the test set "
        "alone moves the figure and nothing about training runs. HD95 / ASD in pixels at the model's input size; an "
        "empty prediction of a frame with bone counts as the image diagonal. *FP outside B-mode*: the share of false-"
        "positive pixels in the static screen (margins, depth ticks, text), where no bone can be.",
        "",
        "| arm | seeds | Dice [95 % t-CI over seeds] | patients only | SD over seeds | HD95 px | source-val Dice | "
        "empty predictions | FP outside B-mode | did not train |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, a in arms.items():
        d = a["dice"]
        lines.append(
            f"| {_label(key, r)} | {len(a['seeds'])} | {d['mean']:.4f} {_plain_ci(d['t_ci95'])} | "
            f"{_plain_ci(d['patient_ci95'])} | {_v(d['sd'], '.3f')} | {_v(a['hd95']['mean'], '.1f')} | "
            f"{a['source_val_dice']:.4f} | {a['empty_predictions']}/{a['frames_scored']} | "
            f"{_v(100 * a['fp_static_share'], '.1f')} % | "
            f"{', '.join(f'seed {s}' for s in a['did_not_train']) or 'none'} |")
    lines += [
        "",
        "## Paired differences and verdicts",
        "",
        f"Difference = arm - comparison arm on the same seeds (per-seed means over patients). p: two-sided exact "
        f"sign-flip test over seeds; the primary comparison at alpha {ALPHA}; secondary comparisons with at least "
        f"{MIN_SEEDS} seeds Holm-corrected as one family (p and interval at the Holm level); secondary comparisons "
        f"with fewer seeds are *underpowered*: descriptive only, no verdict. Verdict *helps* only if p <= {ALPHA}, "
        f"the interval's lower end is > 0 and the gain >= {MIN_EFFECT}; *hurts* symmetrically; else *inconclusive*. "
        "MDE: the smallest true difference these seeds detect with 80 % power at alpha 0.05, from the "
        "comparison's own per-seed SD (infinite below 6 seeds, where no sign-flip test reaches 0.05). Source-val "
        f"gap flagged when > {CONVERGENCE_GAP} for two source-trained arms.",
        "",
        "| arm | vs | role | seeds | Dice diff | interval | p | verdict | MDE | SD over seeds | patients only | "
        "HD95 diff px | source-val gap |",
        "|---|---|---|---:|---:|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for key, c in comps.items():
        flag = " (flag)" if c["convergence_flag"] else ""
        lines.append(
            f"| {_label(c['arm'], r)} | {_label(c['baseline'], r)} | {c['role']}"
            f"{' (underpowered)' if c['underpowered'] else ''} | {len(c['seeds'])} | {c['dice']['mean']:+.4f} | "
            f"{_ci(c['dice']['ci'])} | {c['p']:.3g} | **{c['verdict']}** | {_v(c['mde'], '.3f')} | "
            f"{_v(c['dice']['sd'], '.3f')} | {_ci(c['dice']['patient_ci95'])} | {_v(c['hd95']['mean'], '+.1f')} | "
            f"{c['source_val_dice_gap']:+.4f}{flag} |")
    if analysis["goals"]:
        lines += ["", "Goals (each read off the verdict rule): "
                  + "; ".join(f"{k}: {_goal_text(v)}" for k, v in analysis["goals"].items())]
    lines += ["", "Per-seed paired differences: `study.png`."]
    lines += _run_lines(facts, r)
    lines += ["", "## Pretraining", ""]
    for name, info in facts["pretraining"].items():
        extras = ", ".join(f"{k} {v:.3f}" for k, v in (info.get("extras") or {}).items())
        lines.append(f"- {name}: {info['steps']} steps, last loss {info['last_loss']:.4f}"
                     + (f" ({extras}, means over the run)" if extras else ""))
    lines += ["", "## Arms", ""]
    for key, a in arms.items():
        lines.append(f"- `{_label(key, r)}`: {a['describe']}" + (f" (recipe {a['recipe']})" if a["recipe"] != r else ""))
    return "\n".join(lines) + "\n"


def _primary_lines(analysis: dict[str, Any], r: str) -> list[str]:
    primary = next((c for c in analysis["comparisons"].values() if c["role"] == "primary"), None)
    if primary is None:
        return ["The primary comparison has no seeds scored yet.", ""]
    return [
        f"**Primary: {_label(primary['arm'], r)} - {_label(primary['baseline'], r)} = {primary['dice']['mean']:+.4f} "
        f"Dice, 95 % t-interval {_ci(primary['dice']['ci'])}, sign-flip p = {primary['p']:.3g} over "
        f"{len(primary['seeds'])} seeds; minimal detectable effect {_v(primary['mde'], '.3f')}; verdict "
        f"{primary['verdict']}**" + (" (fewer than 10 seeds: underpowered)" if primary["underpowered"] else "") + ".",
        "",
    ]


def _run_lines(facts: dict[str, Any], r: str) -> list[str]:
    lines: list[str] = []
    if facts.get("did_not_train"):
        lines += ["", "## Runs that did not train", "",
                  "Their source-validation Dice was below 0.1 at the first validation (the pre-declared flag): the "
                  "network predicted (almost) empty masks. They stay in every mean and comparison, as they would "
                  "in use.", "", "| arm | seed | first source-val Dice |", "|---|---:|---:|"]
        lines += [f"| {_label(d['arm'], r)} | {d['seed']} | {_v(d['first_val_dice'] or float('nan'), '.4f')} |"
                  for d in facts["did_not_train"]]
    if facts.get("diverged"):
        lines += ["", "## Runs that diverged", "",
                  "Their loss turned non-finite; the engine stopped before updating the weights with it, and the "
                  "model scored is the checkpoint the selection rule had kept from the validations before that step.",
                  "", "| arm | seed | non-finite loss at step | model kept from step |", "|---|---:|---:|---:|"]
        lines += [f"| {_label(d['arm'], r)} | {d['seed']} | {d['step']} | {d['kept_step']} |" for d in facts["diverged"]]
    if facts.get("failed"):
        lines += ["", "## Runs that failed", "",
                  "They left no model to score (a training that diverged before its first validation, or a unit "
                  "built from one). The seed is missing from its arm: every comparison uses the seeds both of its "
                  "arms have, and a goal that needs the planned seeds reads \"not assessed\". A rerun skips them; "
                  "delete a run's `failed.json` to try it again.",
                  "", "| arm | seed | failed unit | non-finite loss at step | reason |", "|---|---:|---|---:|---|"]
        lines += [f"| {_label(d['arm'], r)} | {d['seed']} | {d['unit']} | {d['step'] if d['step'] else ''} | "
                  f"{d['reason'].replace('|', '/')} |" for d in facts["failed"]]
    return lines


def plot_differences(study: "Study", analysis: dict[str, Any], path: Path) -> Path | None:
    """One figure: per-seed paired Dice (left) and HD95 (right) differences of every comparison,
    with the mean and the verdict's t-interval (Dice) / the 95 % t-interval (HD95)."""
    comps = analysis["comparisons"]
    if not comps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = study.options.recipe
    keys = list(comps)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(keys) * 2), 4.2))
    for ax, metric, ci_key, unit in ((axes[0], "dice", "ci", "Dice"), (axes[1], "hd95", "t_ci95", "HD95 (px)")):
        for i, key in enumerate(keys):
            c = comps[key][metric]
            ax.scatter(np.full(len(c["per_seed"]), i) + np.linspace(-0.12, 0.12, len(c["per_seed"])), c["per_seed"],
                       s=16, color="#888888", zorder=3, label="per seed" if i == 0 else None)
            low, high = c[ci_key]
            if not (math.isfinite(low) and math.isfinite(high)):
                low = high = c["mean"]
            ax.errorbar(i, c["mean"], yerr=[[c["mean"] - low], [high - c["mean"]]], fmt="o", color="#c0392b",
                        capsize=4, zorder=4, label="mean, interval" if i == 0 else None)
        ax.axhline(0.0, color="black", lw=0.8)
        if metric == "dice":
            for y in (MIN_EFFECT, -MIN_EFFECT):
                ax.axhline(y, color="black", lw=0.6, ls=":")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{_label(comps[k]['arm'], r)}\nvs {_label(comps[k]['baseline'], r)}" for k in keys],
                           fontsize=7)
        ax.set_ylabel(f"paired difference, {unit}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("target test Dice, one dot per seed (verdict's t-interval; dotted: +-0.02)", fontsize=9)
    axes[1].set_title("target test HD95, lower is better (95 % t-interval)", fontsize=9)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def write_report(study: "Study", *, say: Callable[[str], None] = print):
    """``study.md``, ``study.json`` and ``study.png`` from every finished evaluation."""
    import platform

    import torch

    from ..card import code_version

    scores = collect(study)
    if not scores:
        say("no finished evaluation yet: no report")
        return None, None, None, None
    analysis = analyse(study, scores)
    pretraining = {}
    for name in PRETRAININGS:
        for pseed in range(study.options.pretrain_seeds):
            info = read_done(study.pretrain_folder(name, pseed))
            if info is not None:
                pretraining[f"{name} seed {pseed}"] = {k: info.get(k) for k in ("steps", "last_loss", "extras", "seconds",
                                                                                  "loss_curve")}
    diverged, failed, untrained = [], [], []
    for choice in study.choices:
        for seed in study.seeds_of(choice):
            run = study.arm_run(choice.arm, choice.recipe, seed)
            info = read_done(run.folder)
            if info and info.get("did_not_train"):
                untrained.append({"arm": choice.key, "seed": seed, "first_val_dice": info.get("first_val_dice")})
            if info and info.get("diverged_at_step"):
                diverged.append({"arm": choice.key, "seed": seed, "step": info["diverged_at_step"],
                                 "kept_step": info.get("best_step"), "message": info.get("diverged")})
            for unit, folder in (("train", run.folder), ("evaluate", study.eval_folder(run))):
                info = read_failed(folder)
                if info is not None:
                    failed.append({"arm": choice.key, "seed": seed, "unit": unit, "reason": info.get("reason", "?"),
                                   "step": info.get("diverged_at_step")})
                    break  # an evaluation fails because its training did: one line per run
    facts = {
        "did_not_train": untrained,
        "diverged": diverged,
        "failed": failed,
        "code_version": code_version(),
        "test_frames": len(study.target_site.select("test", labeled=True)),
        "pretraining": pretraining,
    }
    payload = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(study.options).items()},
        "protocol": study.options.protocol(),
        "machine": {"device": str(study.device), "platform": platform.platform(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads()},
        **facts,
        **analysis,
        "scores": {k: {str(s): v for s, v in per_seed.items()} for k, per_seed in scores.items()},
    }
    md = write_text_atomic(study.out / "study.md", render_markdown(study, analysis, facts))
    js = write_json_atomic(study.out / "study.json", payload)
    fig = plot_differences(study, analysis, study.out / "study.png")
    say(md.read_text())
    say(f"report: {md}, {js}" + (f", {fig}" if fig else ""))
    return md, js, fig, analysis
