"""The report of a study (:mod:`pocus_edge.study`): statistics, the method's goals,
``study.md``, ``study.json`` and ``study.png``.

Statistics (no frame-level p-values):

* arm mean: grand mean over seeds x patients, 95 % CI from a hierarchical bootstrap (seeds with
  replacement, then patients with replacement);
* paired difference to the comparison arm on the seeds both have: the same bootstrap on the
  (seed, patient) differences; a two-sided bootstrap p-value; Holm's correction across every
  comparison against a lower bound (students against their teachers form a second family); the
  interval at the Holm level of the arm's rank;
* verdict: *helps* if the Holm-level interval's lower end is > 0, the Holm-adjusted p <= 0.05 and
  the gain >= 0.02 Dice; *hurts* symmetrically; else *inconclusive*;
* convergence check: source-validation Dice of each source-trained arm against its comparison
  arm, flagged when more than 0.01 apart (the arms did not reach the same source fit).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..io import write_bytes_atomic, write_json_atomic, write_text_atomic
from .arms import ARMS, PRETRAININGS, comparison_of
from .markers import read_done, read_failed
from .scoring import collect, nanmean

if TYPE_CHECKING:
    from .folder import Study

MIN_EFFECT = 0.02
CONVERGENCE_GAP = 0.01
ALPHA = 0.05


def _matrix(per_seed: dict[int, dict[str, Any]], seeds: list[int], patients: list[str], metric: str) -> np.ndarray:
    return np.array([[per_seed[s]["patients"].get(p, {}).get(metric, np.nan) for p in patients] for s in seeds])


# ---------------------------------------------------------------------------------------------
# Statistics


def analyse(study: "Study", scores: dict[str, Any]) -> dict[str, Any]:
    from ..metrics import bootstrap_p_value, hierarchical_bootstrap, holm_adjust, percentile_interval, verdict

    n_boot = study.options.bootstrap
    patients = sorted({p for per_seed in scores.values() for s in per_seed.values() for p in s["patients"]})
    arms: dict[str, Any] = {}
    for choice in study.choices:
        per_seed = scores.get(choice.key, {})
        seeds = sorted(per_seed)
        if not seeds:
            continue
        entry: dict[str, Any] = {"arm": choice.arm, "recipe": choice.recipe, "seeds": seeds,
                                 "describe": ARMS[choice.arm].describe}
        for metric in ("dice", "iou", "hd95", "asd"):
            m = _matrix(per_seed, seeds, patients, metric)
            draws = hierarchical_bootstrap(m, n_boot, seed=1)
            entry[metric] = {"mean": nanmean(m), "ci95": percentile_interval(draws, ALPHA)}
        entry["per_seed_dice"] = [nanmean(_matrix(per_seed, [s], patients, "dice")) for s in seeds]
        entry["source_val_dice"] = float(np.mean([per_seed[s]["source_val_dice"] for s in seeds]))
        entry["frames_without_boundary"] = int(sum(v["empty_boundary"] for s in seeds for v in per_seed[s]["patients"].values()))
        entry["frames_scored"] = int(sum(v["frames"] for s in seeds for v in per_seed[s]["patients"].values()))
        arms[choice.key] = entry

    comparisons: dict[str, Any] = {}
    draws_of: dict[str, np.ndarray] = {}
    for choice in study.choices:
        base = comparison_of(choice.arm, choice.recipe, study.options.recipe)
        if base is None or choice.key not in arms or f"{base[0]}@{base[1]}" not in arms:
            continue
        base_key = f"{base[0]}@{base[1]}"
        seeds = sorted(set(scores[choice.key]) & set(scores[base_key]))
        if not seeds:
            continue
        entry = {"arm": choice.key, "baseline": base_key, "seeds": seeds}
        for metric in ("dice", "hd95"):
            diff = (_matrix(scores[choice.key], seeds, patients, metric)
                    - _matrix(scores[base_key], seeds, patients, metric))
            draws = hierarchical_bootstrap(diff, n_boot, seed=2)
            entry[metric] = {"mean": nanmean(diff), "ci95": percentile_interval(draws, ALPHA),
                             "per_seed": [nanmean(row) for row in diff]}
            if metric == "dice":
                draws_of[choice.key] = draws
                entry["p_bootstrap"] = bootstrap_p_value(draws)
        # On the seeds both arms have, like the differences (arm means may cover other seeds).
        sv = float(np.mean([scores[choice.key][s]["source_val_dice"] - scores[base_key][s]["source_val_dice"]
                            for s in seeds]))
        entry["source_val_dice_gap"] = sv
        entry["convergence_flag"] = bool(ARMS[choice.arm].convergence_check and ARMS[base[0]].convergence_check
                                         and abs(sv) > CONVERGENCE_GAP)
        comparisons[choice.key] = entry
    # Two questions, two Holm families: "does this arm beat the lower bound?" and "does this
    # student keep its teacher's accuracy?"; adding students leaves the first family's verdicts as they were.
    families: dict[str, dict[str, float]] = {}
    for key, entry in comparisons.items():
        entry["family"] = holm_family(entry["baseline"])
        families.setdefault(entry["family"], {})[key] = entry["p_bootstrap"]
    holm = {k: v for family in families.values() for k, v in holm_adjust(family, ALPHA).items()}
    for key, entry in comparisons.items():
        entry["family_size"] = len(families[entry["family"]])
        level = holm[key]["alpha"]
        entry["p_holm"] = holm[key]["p_holm"]
        entry["holm_alpha"] = level
        entry["dice"]["ci_holm"] = percentile_interval(draws_of[key], level)
        entry["verdict"] = verdict(entry["dice"]["mean"], entry["dice"]["ci_holm"], entry["p_holm"], alpha=ALPHA,
                                   min_effect=MIN_EFFECT)
    return {"patients": patients, "arms": arms, "comparisons": comparisons, "goals": _goals(study, arms, comparisons)}


def holm_family(baseline_key: str) -> str:
    """The multiple-comparison family of a comparison: against a lower bound (the method's
    question) or against another arm (a student against its teacher)."""
    return "lower bound" if baseline_key.partition("@")[0] == "lower" else "teacher"


def _goals(study: "Study", arms: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """The method's claims on this data, for every fused arm, SSL branch and student in the study:
    fused >= lower + 0.03 with its Holm-level CI above 0; each SSL branch >= the lower bound; fused
    <= the upper bound; a student >= its teacher - 0.01. A claim is True or False, or None ("not
    assessed") while an arm it reads has fewer seeds than the study planned for it."""
    r = study.options.recipe
    planned = {c.key: len(study.seeds_of(c)) for c in study.choices}
    upper = arms.get(f"upper@{r}")

    def judged(value: bool, *keys: str) -> bool | None:
        complete = all(len(arms[k]["seeds"]) >= planned.get(k, 0) for k in keys)
        return bool(value) if complete else None

    goals: dict[str, Any] = {}
    for key, c in comparisons.items():
        arm, _, recipe = key.partition("@")
        if recipe != r:
            continue
        kind = ARMS[arm]
        baseline = c["baseline"].partition("@")[0]
        if c["baseline"] == f"lower@{r}" and kind.claim == "fusion":
            goals[f"{arm} >= lower + 0.03, CI excluding 0"] = judged(
                c["dice"]["mean"] >= 0.03 and c["dice"]["ci_holm"][0] > 0, key, c["baseline"])
            if upper is not None:
                goals[f"{arm} <= upper"] = judged(arms[key]["dice"]["mean"] <= upper["dice"]["mean"], key, f"upper@{r}")
        elif c["baseline"] == f"lower@{r}" and kind.claim == "branch":
            goals[f"{arm} >= lower"] = judged(c["dice"]["mean"] >= 0, key, c["baseline"])
        elif ARMS[baseline].claim == "fusion":  # a student against its teacher
            goals[f"{arm} >= {baseline} - 0.01"] = judged(c["dice"]["mean"] >= -0.01, key, c["baseline"])
    return goals


def _goal_text(value: bool | None) -> str:
    return "not assessed (fewer seeds than planned)" if value is None else ("yes" if value else "NO")


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
        f"{len(analysis['patients'])} target test patients ({facts['test_frames']} labeled frames), "
        f"{study.options.bootstrap} bootstrap draws. Code {facts['code_version']}.",
        "",
        "## Target test, per arm",
        "",
        "Means over seeds x test patients (each patient weighted equally); 95 % CI from a hierarchical bootstrap "
        "(seeds, then patients). HD95 / ASD in pixels at the model's input size, over frames where both masks are "
        "non-empty.",
        "",
        "| arm | seeds | Dice [95 % CI] | IoU | HD95 px [95 % CI] | ASD px | source-val Dice | frames w/o boundary |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for key, a in arms.items():
        lines.append(
            f"| {_label(key, r)} | {len(a['seeds'])} | {a['dice']['mean']:.4f} {_plain_ci(a['dice']['ci95'])} | "
            f"{a['iou']['mean']:.4f} | {_v(a['hd95']['mean'], '.2f')} {_plain_ci(a['hd95']['ci95'], 2)} | "
            f"{_v(a['asd']['mean'], '.2f')} | "
            f"{a['source_val_dice']:.4f} | {a['frames_without_boundary']}/{a['frames_scored']} |")
    lines += [
        "",
        "## Paired differences and verdicts",
        "",
        f"Difference = arm - comparison arm on the same seeds and patients. Holm-level CI: the interval at the "
        f"Holm step of the arm's p-value rank ({_families(comps)}). Verdict *helps* only if that "
        f"interval's lower end is > 0, the Holm-adjusted p <= {ALPHA} and the gain >= {MIN_EFFECT}; *hurts* "
        "symmetrically; else *inconclusive*. Source-val gap = source-validation Dice difference (flagged when > "
        f"{CONVERGENCE_GAP} for two source-trained arms: they did not fit the source equally).",
        "",
    ]
    if any(not c["baseline"].startswith("lower@") for c in comps.values()):
        lines += ["A row whose comparison arm is not a lower bound (a student against its fused teacher of the same "
                  "seed) is that arm minus its comparison arm: for a student, *hurts* means it lost accuracy to its "
                  "teacher, *inconclusive* that no loss or gain could be shown.", ""]
    lines += [
        "| arm | vs | seeds | Dice diff | 95 % CI | Holm-level CI | p (Holm) | verdict | HD95 diff px [95 % CI] | source-val gap |",
        "|---|---|---:|---:|---|---|---:|---|---|---:|",
    ]
    for key, c in comps.items():
        flag = " (flag)" if c["convergence_flag"] else ""
        lines.append(
            f"| {_label(key, r)} | {_label(c['baseline'], r)} | {len(c['seeds'])} | {c['dice']['mean']:+.4f} | "
            f"{_ci(c['dice']['ci95'])} | {_ci(c['dice']['ci_holm'])} | {c['p_holm']:.3g} | **{c['verdict']}**"
            f"{' (1 seed)' if len(c['seeds']) < 2 else ''} | "
            f"{_v(c['hd95']['mean'], '+.2f')} {_ci(c['hd95']['ci95'], 2)} | {c['source_val_dice_gap']:+.4f}{flag} |")
    if any(len(c["seeds"]) < 2 for c in comps.values()):
        lines += ["", "A row marked *(1 seed)* compares a single training seed: its interval and p-value cover the "
                  "test patients only, not the seed-to-seed spread of training, so it cannot tell an effect of "
                  "the arm from the luck of that seed."]
    if analysis["goals"]:
        lines += ["", "Goals: " + "; ".join(f"{k}: {_goal_text(v)}" for k, v in analysis["goals"].items())]
    lines += ["", "Per-seed paired differences: `study.png`."]
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
    lines += ["", "## Pretraining", ""]
    for name, info in facts["pretraining"].items():
        extras = ", ".join(f"{k} {v:.3f}" for k, v in (info.get("extras") or {}).items())
        lines.append(f"- {name}: {info['steps']} steps, last loss {info['last_loss']:.4f}"
                     + (f" ({extras}, means over the run)" if extras else ""))
    lines += ["", "## Arms", ""]
    for key, a in arms.items():
        lines.append(f"- `{_label(key, r)}`: {a['describe']}" + (f" (recipe {a['recipe']})" if a["recipe"] != r else ""))
    return "\n".join(lines) + "\n"


def _families(comps: dict[str, Any]) -> str:
    sizes: dict[str, int] = {}
    for c in comps.values():
        sizes[c["family"]] = sizes.get(c["family"], 0) + 1
    if len(sizes) <= 1:
        return f"family of {len(comps)} comparisons"
    return "families: " + ", ".join(f"{n} comparison(s) with a {name}" for name, n in sizes.items())


def plot_differences(study: "Study", analysis: dict[str, Any], path: Path) -> Path | None:
    """One figure: per-seed paired Dice (left) and HD95 (right) differences of every arm to its
    comparison arm, with the bootstrap mean and Holm-level (Dice) / 95 % (HD95) intervals."""
    comps = analysis["comparisons"]
    if not comps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = study.options.recipe
    keys = list(comps)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(keys) * 2), 4.2))
    for ax, metric, ci_key, unit in ((axes[0], "dice", "ci_holm", "Dice"), (axes[1], "hd95", "ci95", "HD95 (px)")):
        for i, key in enumerate(keys):
            c = comps[key][metric]
            ax.scatter(np.full(len(c["per_seed"]), i) + np.linspace(-0.12, 0.12, len(c["per_seed"])), c["per_seed"],
                       s=16, color="#888888", zorder=3, label="per seed" if i == 0 else None)
            low, high = c[ci_key]
            ax.errorbar(i, c["mean"], yerr=[[c["mean"] - low], [high - c["mean"]]], fmt="o", color="#c0392b",
                        capsize=4, zorder=4, label="mean, interval" if i == 0 else None)
        ax.axhline(0.0, color="black", lw=0.8)
        if metric == "dice":
            for y in (MIN_EFFECT, -MIN_EFFECT):
                ax.axhline(y, color="black", lw=0.6, ls=":")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{_label(k, r)}\nvs {_label(comps[k]['baseline'], r)}" for k in keys], fontsize=7)
        ax.set_ylabel(f"paired difference, {unit}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("target test Dice (Holm-level interval; dotted: +-0.02)", fontsize=9)
    axes[1].set_title("target test HD95, lower is better (95 % interval)", fontsize=9)
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
        info = read_done(study.out / "pretrain" / name)
        if info is not None:
            pretraining[name] = {k: info.get(k) for k in ("steps", "last_loss", "extras", "seconds", "loss_curve")}
    diverged, failed = [], []
    for choice in study.choices:
        for seed in study.seeds_of(choice):
            run = study.arm_run(choice.arm, choice.recipe, seed)
            info = read_done(run.folder)
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
