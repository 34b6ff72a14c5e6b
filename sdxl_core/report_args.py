"""``sdxl-bench report RUN_DIR... [--out DIR]``: the HTML report of run folders (no torch import).

One run folder: the report goes to ``RUN_DIR/report/index.html`` and the parent's ``index.html`` (the list of
runs) is refreshed. Several run folders (side by side, e.g. LoRA versions or commits): ``--out`` is required.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdxl_core.errors import InvalidConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (reports/<run_id>) with results.json")
    p.add_argument("--out", default=None, help="report folder (default for one run: RUN_DIR/report; required for "
                                               "several)")
    p.add_argument("--index", default=None, metavar="REPORTS_DIR",
                   help="also rewrite REPORTS_DIR/index.html, the list of runs (default: the run's parent folder "
                        "when the report goes to RUN_DIR/report)")
    p.add_argument("--no-index", action="store_true", help="do not rewrite any index.html of runs")


def main(args: argparse.Namespace) -> int:
    from sdxl_core.html_report import default_report_dir, render_index, render_report

    run_dirs = [Path(d) for d in args.run_dirs]
    if args.out is None and len(run_dirs) > 1:
        raise InvalidConfigError(f"{len(run_dirs)} run folders need --out DIR for their joint report")
    out = Path(args.out) if args.out is not None else default_report_dir(run_dirs[0])
    print(f"wrote {render_report(run_dirs, out)}")
    if args.no_index:
        return 0
    root = Path(args.index) if args.index is not None else (run_dirs[0].parent if args.out is None else None)
    if root is not None:
        print(f"wrote {render_index(root)}")
    return 0
