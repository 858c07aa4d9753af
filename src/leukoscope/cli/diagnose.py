"""``leukoscope diagnose PATIENT... [--model apl] [--output FILE.csv] [--report DIR]``.

A patient is a folder of cell images (searched recursively; the patient is the folder's name) or a manifest CSV
(``path,label,patient``; one patient per distinct ``patient``). The CSV has exactly the columns
``patient,label,confidence,p_AML,p_APL,n_cells,ood_share`` (``ood_share``: the share of cells unlike the
cell-type model's training cells); unreadable cells are skipped and named on standard error.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("diagnose", help="AML vs APL for each patient from a folder (or manifest) of cell images")
    p.add_argument("patients", nargs="+", metavar="PATIENT",
                   help="a folder of one patient's cell images, or a manifest CSV with path,label,patient")
    p.add_argument("--model", default=None, help="patient-level model name or directory (default: apl)")
    p.add_argument("--cell-model", default=None,
                   help="cell-type model name or directory (default: the one the patient model was trained with)")
    p.add_argument("--output", "-o", help="CSV file to write (default: standard output)")
    p.add_argument("--report", metavar="DIR", help="also write an HTML report per patient and an index into DIR")
    p.add_argument("--top", type=int, default=8, help="cells shown per patient in the report (default 8)")
    p.add_argument("--no-heatmaps", action="store_true", help="report without Grad-CAM heatmaps (faster)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from leukoscope.diagnose import Diagnoser, patients_from, write_csv

    patients = patients_from(args.patients)
    d = Diagnoser(args.model, args.cell_model)
    results, failed = [], []
    for pi in patients:
        try:
            r = d.diagnose(pi)
        except ValueError as exc:  # no readable cell at all: name the patient, go on with the others
            print(f"leukoscope diagnose: {pi.name}: {exc}", file=sys.stderr)
            failed.append(pi.name)
            continue
        for path, reason in r.skipped:
            print(f"leukoscope diagnose: {pi.name}: skipped unreadable cell {path}: {reason}", file=sys.stderr)
        results.append(r)
    write_csv(results, args.output)
    if args.report:
        from leukoscope.diagnose.report import write_reports

        index = write_reports(results, d, args.report, top_k=args.top, heatmaps=not args.no_heatmaps)
        print(f"report: {index}", file=sys.stderr)
    n_skipped = sum(len(r.skipped) for r in results)
    if args.output:
        print(f"wrote {len(results)} patient(s) to {args.output}"
              + (f"; {n_skipped} unreadable cell(s) skipped" if n_skipped else "")
              + (f"; {len(failed)} patient(s) without readable cells" if failed else ""), file=sys.stderr)
    return 1 if failed or n_skipped else 0
