"""Output of the command line: progress lines on stderr, output paths checked
before any work (suffix, not an input file), atomic writes, the fit record
(--json) and the parameter table written by ``mlsem fit``.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

from ..errors import MlsemError

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell convention 128 + SIGINT


STATUS_COLUMNS = ("name", "estimate", "std_err", "z", "p_value", "ci_low", "ci_high")


# ---- progress -----------------------------------------------------------------
class Progress:
    """Progress lines on stderr: stage messages always (unless quiet), the
    optimizer's iterations at most once a second."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._last = self.t0
        self.prefix = ""

    def say(self, msg: str) -> None:
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{el:7.1f}s] {self.prefix}{msg}", file=sys.stderr, flush=True)

    def prepared(self, prep) -> None:
        lv = ", ".join(f"{x.ngroups:,} {x.name}" for x in prep.levels)
        self.say(f"reshaped: {prep.nobs:,} observations, {lv}; {prep.nslots:,} slots, "
                 f"{prep.npatterns:,} missing patterns")
        self._last = time.perf_counter()

    def stage(self, what: str) -> None:
        self.say(what)

    def __call__(self, it: int, loglik: float) -> None:
        now = time.perf_counter()
        if now - self._last >= 1.0:
            self._last = now
            self.say(f"optimizer iteration {it}: loglik {loglik:.6f}")


# ---- helpers ------------------------------------------------------------------
def _check_out(path: str, option: str, suffixes=None) -> None:
    """Refuse an output path that cannot be written, before any work."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise MlsemError(f"{option} {path!r}: the file name must end with {' or '.join(suffixes)}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise MlsemError(f"{option} {path!r}: directory {d!r} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise MlsemError(f"{option} {path!r}: directory {d!r} is not writable")
    if os.path.isdir(path):
        raise MlsemError(f"{option} {path!r} is a directory")


# options that name files mlsem writes, and files or directories it reads
_OUTPUTS = (("out", "--out"), ("json", "--json"), ("syntax_out", "--syntax-out"))


_INPUTS = (("data", "DATA"), ("syntax", "--syntax"), ("newdata", "--newdata"))


def _input_files(spec: str) -> list:
    """The files an input argument reads: the file, a directory's files, a glob's matches."""
    import glob
    if os.path.isdir(spec):
        return [os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs]
    if any(ch in spec for ch in "*?["):
        return glob.glob(spec, recursive=True)
    return [spec]


def _check_outputs_not_inputs(args) -> None:
    """Refuse, before any work, an output path that is one of the inputs (or
    lies in an input directory, or matches an input glob): writing it would
    destroy the data being read."""
    import fnmatch
    outs = [(opt, getattr(args, a)) for a, opt in _OUTPUTS if getattr(args, a, None)]
    ins = [(opt, getattr(args, a)) for a, opt in _INPUTS if isinstance(getattr(args, a, None), str)]
    for opt, out in outs:
        real = os.path.realpath(out)
        for iopt, spec in ins:
            clash = (os.path.isdir(spec) and real.startswith(os.path.realpath(spec) + os.sep)) or \
                (any(ch in spec for ch in "*?[") and fnmatch.fnmatch(real, os.path.realpath(spec)))
            clash = clash or any(os.path.realpath(f) == real for f in _input_files(spec))
            if clash:
                raise MlsemError(f"{opt} {out!r} is the input {iopt} {spec!r} (or inside it): "
                                 "refusing to overwrite the data being read; choose another output path")
    seen = {}
    for opt, out in outs:
        real = os.path.realpath(out)
        if real in seen:
            raise MlsemError(f"{opt} {out!r} and {seen[real]} name the same file")
        seen[real] = opt


def _write(path: str, option: str, write) -> None:
    from ..results.export import atomic_write
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise MlsemError(f"{option} {path!r}: cannot write: {exc.strerror or exc}") from None


def _write_parquet(df, path, option):
    _write(path, option, lambda tmp: df.write_parquet(tmp))


def _write_text(text, path, option):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _write(path, option, w)


def _command_line(argv) -> str:
    return shlex.join(["mlsem"] + list(argv if argv is not None else sys.argv[1:]))


def _status(res) -> str:
    if not res.converged:
        return f"not converged: {res.opt.message}"
    if not res.identified:
        return f"not identified: confounded {', '.join(res.confounded)}"
    return "ok"


def _json_default(o):
    from ..results.export import _json_default as default
    return default(o)


def _fit_record(res) -> dict:
    d = res.to_dict()
    d["tests"] = {"lr_vs_linear_regression": d.get("lr_test_vs_linear_regression", {}),
                  "wald_fixed_effects": d.get("wald_fixed", {})}
    if res.method == "ADF":
        d["tests"]["adf_vs_saturated"] = res.fit_test()
    d["status"] = _status(res)
    return d


def _table(res):
    """The parameter table with the chosen intervals (profile or bootstrap) in
    ci_low/ci_high, ``ci_kind`` saying which, bootstrap std. errors beside."""
    import polars as pl
    tab = res.params
    if res.ci_table is not None:
        ci = res.ci_table.rename({"lower": "ci_low", "upper": "ci_high"})
        tab = tab.drop("ci_low", "ci_high").join(ci, on="name", how="full", coalesce=True,
                                                   maintain_order="left")
    if res.ci_kind != "wald":
        listed = res.ci_table["name"] if res.ci_table is not None else tab["name"]
        tab = tab.with_columns(pl.when(pl.col("name").is_in(listed.implode()))
                               .then(pl.lit(res.ci_kind)).otherwise(pl.lit("wald")).alias("ci_kind"))
    if res.boot is not None:
        se = res.boot.std_err
        tab = tab.with_columns(pl.col("name").replace_strict(se, default=None,
                                                              return_dtype=pl.Float64).alias("boot_se"))
    return tab
