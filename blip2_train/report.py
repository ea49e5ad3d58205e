"""Report of a bridge ablation sweep: ``python -m blip2_train.report SWEEP_DIR``.

Writes ``SWEEP_DIR/report.md`` (one markdown table: bridge, visual tokens, trainable parameters,
samples/s, val loss, CIDEr, attribute / count accuracy, hallucination; mean ± spread over seeds at each
arm's best learning rate) and PNG plots (validation loss vs step, quality vs visual tokens, quality vs
samples/s) beside it, and prints the table. See docs/bridges.md.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from blip2_train.training.sweep_report import write_report

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit(f"usage: python -m blip2_train.report SWEEP_DIR\n{__doc__}")
    result = write_report(args[0])
    print(result["table"], end="")
    print(f"wrote {result['report']} and {', '.join(p.name for p in result['plots'])}")


if __name__ == "__main__":
    main()
