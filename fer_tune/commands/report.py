"""`fer-tune report DIR [DIR ...]`: one experiment's report.md, or several side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fer_tune.errors import UserError
from fer_tune.io import atomic_write_text
from fer_tune.layout import REPORT_DIR
from fer_tune.report import build_report, compare_experiments


def report(experiments: list[Path], out: Optional[Path]) -> None:
    if len(experiments) == 1:
        if out:
            raise UserError("--out: only used when comparing several experiments; the report of one "
                            f"is written to {experiments[0] / REPORT_DIR / 'report.md'}")
        print(f"report: {build_report(experiments[0])}")
        return
    table = compare_experiments(experiments)
    print(table, end="")
    if out:
        atomic_write_text(out, table)
        print(f"written to {out}")
