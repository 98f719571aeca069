"""The fault-injection report: every scenario of ``chaos_scenarios`` with long sizes, one line each.

Run from a checkout (docs/fault-tolerance.md)::

    .venv/bin/python tests/chaos_report.py [--quick] [--only NAME …] [--json FILE]

Per fault: how many were injected, samples lost, duplicated or wrong, and the seconds to recover (the
longest stall of the training loop from the fault on) or, where no teacher is left, to the clear
error. Progress goes to stderr, the report to stdout. Exits 1 when a sample was lost, duplicated or
wrong, or a scenario failed to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from chaos_scenarios import FaultResult, run_report, scenarios


def format_row(name: str, result: FaultResult) -> str:
    """One line of the report."""
    skipped = result.error.startswith("skipped")
    if result.error and not skipped:
        seconds = f"error after {result.error_after_s:5.1f} s"
    else:
        seconds = f"recovered in {result.recover_s:5.1f} s"
    line = (
        f"{name:<20} {result.faults_injected:>2} fault(s) {result.samples:>5} samples  lost {result.lost:<3} "
        f"duplicated {result.duplicated:<3} wrong {result.wrong:<3} {seconds}"
    )
    return f"{line}  {result.error[:160]}" if result.error else line


def main(argv: list[str] | None = None) -> int:
    names = [name for name, _ in scenarios(quick=False)]  # the same names at either size
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the test suite's small sizes")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help=f"only these: {', '.join(names)}")
    parser.add_argument("--json", metavar="FILE", help="also write every result, with its details, to FILE")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"no scenario {', '.join(unknown)}; the scenarios: {', '.join(names)}")
    started = time.monotonic()

    def progress(name: str) -> None:
        print(f"{time.monotonic() - started:6.0f} s  {name}", file=sys.stderr, flush=True)

    results = run_report(args.quick, args.only, progress)
    ran = [name for name in names if not args.only or name in args.only]
    print(f"fault-injection report ({'quick' if args.quick else 'full'} sizes, {time.monotonic() - started:.0f} s)")
    for name, result in zip(ran, results):
        print(format_row(name, result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({name: result.to_json() for name, result in zip(ran, results)}, fh, indent=1)
    failed = [r for r in results if not r.clean or r.error.startswith("scenario failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
