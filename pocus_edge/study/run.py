"""``run_study``: plan, estimate, run and report a study (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .budgets import STAGE_KINDS, StudyOptions, check_protocol
from .folder import Study
from .pace import Pace, format_estimate, measure_pace
from .plan import plan_units
from .report import write_report
from .scheduler import run_units


def format_sizing(study_json: str | Path, planned_seeds: int) -> str:
    """Lines of the estimate that size the run from an earlier study's (or a pilot's) measured
    per-seed SDs: seeds needed for 0.03 and 0.05 Dice at 80 % power, and this run's MDE."""
    import json

    from ..errors import ConfigError
    from .stats import PLANNING_EFFECTS, sizing

    path = Path(study_json)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable study.json ({exc})") from None
    rows = sizing(data if isinstance(data, dict) else {}, planned_seeds)
    if not rows:
        raise ConfigError(f"{path}: no comparison with per-seed differences of at least 2 seeds to size from")
    lines = [f"sizing from {path} (paired per-seed Dice differences; 80 % power, two-sided alpha 0.05):"]
    for row in rows:
        needed = ", ".join(f"{e}: {n if n is not None else '> 100000'} seeds" for e, n in row["needed"].items())
        lines.append(f"  {row['comparison']}: SD {row['sd']:.3f} over {row['seeds']} seeds -> for an effect of {needed}; "
                     f"this run's {planned_seeds} seeds detect {row['mde_planned']:.3f}")
    effects = " and ".join(str(e) for e in PLANNING_EFFECTS)
    lines.append(f"  (the seeds needed are those of a paired t-test at the measured SD for {effects} Dice; fewer than "
                 "6 seeds never reach 0.05 with the exact sign-flip test)")
    return "\n".join(lines)


@dataclass
class StudyResult:
    out: Path
    report_md: Path | None
    report_json: Path | None
    figure: Path | None
    summary: dict[str, Any] | None
    units_run: int
    units_total: int


def run_study(options: StudyOptions, *, say: Callable[[str], None] | None = None, estimate_only: bool = False,
              report_only: bool = False) -> StudyResult:
    """Run (or resume) a study and write its report; see the package docstring."""
    say = say or (lambda text: print(text, flush=True))
    study = Study(options)
    study.out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        check_protocol(study)
    say(f"study {study.out}: arms {', '.join(c.key + (f':{c.seeds}' if c.seeds != options.seeds else '') for c in study.choices)}; "
        f"seeds {study.seeds}; preset {options.preset}; budget {study.budget.name} "
        f"(mim {study.budget.mim[0]}x{study.budget.mim[1]}, contrastive {study.budget.contrastive[0]}x"
        f"{study.budget.contrastive[1]}, finetune {study.budget.finetune[0]}x{study.budget.finetune[1]}, distill "
        f"{study.budget.distill[0]}x{study.budget.distill[1]}); device {study.device}")
    pace = measure_pace(study) if not report_only else Pace(dict.fromkeys(STAGE_KINDS, 0.0), 0, 0)
    units = plan_units(study, pace)
    if not report_only:
        say(format_estimate(units, pace))
        if options.sd_from:
            say(format_sizing(options.sd_from, options.seeds))
    ran = 0
    if not (estimate_only or report_only):
        ran = run_units(units, say)
    if estimate_only:
        return StudyResult(study.out, None, None, None, None, 0, len(units))
    md, js, fig, summary = write_report(study, say=say)
    return StudyResult(study.out, md, js, fig, summary, ran, len(units))
