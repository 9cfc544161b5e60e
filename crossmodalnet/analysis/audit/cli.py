"""`crossmodalnet audit RUN DATA --out DIR [...]`: run the audit, write its report, print the verdicts."""

from __future__ import annotations

import argparse

from crossmodalnet.analysis.audit.report import write_audit
from crossmodalnet.analysis.audit.run import run_audit
from crossmodalnet.analysis.mi import MI_ESTIMATORS

__all__ = ["audit_from_cli"]


def audit_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet audit RUN DATA --out DIR [...]`: audit, write, print one line per claim."""
    estimators = list(MI_ESTIMATORS) if args.estimator == "both" else [args.estimator]
    results = run_audit(args.run, args.data, cases=args.cases, estimators=estimators, pca_dim=args.pca_dim,
                        split=args.split, device=args.device, balancing_steps=args.balancing_steps,
                        lipschitz_edge=args.lipschitz_edge, power_iterations=args.power_iterations, seed=args.seed,
                        pair=tuple(getattr(args, "pair", None) or (0, 1)))
    paths = write_audit(results, args.out)
    for c in results["claims"]:
        print(f"{c.verdict:28s} {c.claim}")
    print(f"audit: {len(results['claims'])} claims in {results['seconds']:.0f} s; wrote {paths['md']} and "
          f"{paths['json'].name}")
