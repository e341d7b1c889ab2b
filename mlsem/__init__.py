"""mlsem: multilevel linear random-effects models as structural equation models.

A nested model ``y ~ x + (1 | k/j)`` is the constrained SEM of its wide form
(one row per top-level unit k, one column per slot below it); it is fitted by
Gaussian full-information ML over missing-data patterns, which makes
unbalanced data just missing cells.

Layers, one folder each (top to bottom; the import graph has no cycles,
tests/test_layers.py; one line per module in docs/design.md):

    cli/        the mlsem command: argument parsing, progress, file outputs
    api/        fit() (fitting.py), sem() (semfit.py), multilevel(), to_wide() (bridge.py)
    results/    FitResult: tables, summaries, export (fitresult.py); BLUPs and
                predictions (predict.py); path diagrams (diagram.py)
    inference/  robust/cluster errors and Wald tests (vce.py), the saturated-model test
                (fittest.py), score tests, LR tests, small-sample df, profile
                intervals, bootstrap
    estimate/   start values, L-BFGS-B, Newton, information (optimize.py), REML, ADF
    model/      parameter table -> matrices, the kernel call, the chain rule
                (multilevel.py, sem.py), the Cython kernel _core.pyx and its
                NumPy oracle _oracle.py, per-unit scores
    data/       Polars: read, validate, ids -> slots and patterns (prepare.py), the
                formula's design columns (encode.py), a SEM's wide data (wide.py),
                simulation and shipped data
    spec/       formulas, lavaan syntax, relaxations -> the parameter table
    backends/   the Dask driver (dask.py) and its worker tasks (partitions.py)
"""
__version__ = "0.1.0"

from .errors import ConvergenceWarning, MlsemError, PerformanceWarning, RankDeficiencyWarning  # noqa: E402
from .api.fitting import fit  # noqa: E402
from .spec.survey import SurveyDesign  # noqa: E402
from .inference.lrtest import lrtest  # noqa: E402
from .data.simulate import simulate, example_data  # noqa: E402
from .api.semfit import sem  # noqa: E402
from .api.bridge import multilevel, to_wide  # noqa: E402
from .results.predict import random_effects  # noqa: E402
from .results.diagram import diagram  # noqa: E402

__all__ = ["fit", "SurveyDesign", "sem", "multilevel", "lrtest", "simulate", "example_data", "random_effects", "to_wide",
           "diagram", "MlsemError", "ConvergenceWarning", "PerformanceWarning",
           "RankDeficiencyWarning", "__version__"]
