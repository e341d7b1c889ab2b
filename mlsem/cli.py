"""Command line: ``mlsem example`` fits the embedded example and prints the tables."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_example(args) -> int:
    from .api import fit
    from .simulate import example_data
    data = example_data()
    print("mlsem example: the seed's design, 100 counties x 2 schools x 2 pupils,")
    print("y = 2 x + U_k + V_jk + E_ijk (all sd 1); model y ~ x + (1 | k/j)\n")
    res = fit(data, "y ~ x + (1 | k/j)")
    print(res.summary())
    return 0 if res.converged else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlsem", description="Multilevel models as SEMs, fitted by FIML.")
    p.add_argument("--version", action="version", version=f"mlsem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="fit the embedded example data and print the tables")
    ex.set_defaults(func=_cmd_example)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
