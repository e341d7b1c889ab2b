"""mlsem: multilevel linear random-effects models as structural equation models.

A nested model ``y ~ x + (1 | k/j)`` is the constrained SEM of its wide form
(one row per top-level unit k, one column per slot below it); it is fitted by
Gaussian full-information ML over missing-data patterns, which makes
unbalanced data just missing cells.

Layers (data flows top to bottom; no layer imports one above it):

    cli        mlsem.cli        argument parsing, progress, file outputs
    api        mlsem.api        fit(), validation of user arguments, frozen options
               mlsem.bridge     sem() (general SEMs in lavaan syntax) and multilevel()
                                (a nested model as wide data + lavaan syntax)
    spec       mlsem.formula, mlsem.spec, mlsem.relax, mlsem.lavaan
                                formula + relaxations / lavaan syntax -> parameter table
                                (single source of truth)
    data       mlsem.data       Polars: read, validate, nested -> slots, patterns
               mlsem.encode     the formula's fixed part and random slopes -> design
                                columns (formulaic, R's contrasts), kept for predict
    model      mlsem.model      parameter table -> matrices, chain rule
               mlsem.sem        the same for general SEMs (LISREL matrices, lavaan defaults)
               mlsem.adf        ADF / GMM: sample moments, Gamma, implied moments and their
                                Jacobian, the Satorra-Bentler scaling; mlsem.semscores: SEM scores
    kernel     mlsem._core      Cython per-pattern FIML (oracle: mlsem._oracle)
    estimate   mlsem.estimate   start values, L-BFGS-B, Newton polish, information
    results    mlsem.results, mlsem.lrtest, mlsem.predict
                                tables, tests, export; reads fitted state only
"""
__version__ = "0.1.0"

from .errors import ConvergenceWarning, MlsemError, PerformanceWarning  # noqa: E402
from .api import fit  # noqa: E402
from .lrtest import lrtest  # noqa: E402
from .simulate import simulate, example_data  # noqa: E402
from .bridge import sem, multilevel, to_wide  # noqa: E402
from .predict import random_effects  # noqa: E402
from .diagram import diagram  # noqa: E402

__all__ = ["fit", "sem", "multilevel", "lrtest", "simulate", "example_data", "random_effects", "to_wide",
           "diagram", "MlsemError", "ConvergenceWarning", "PerformanceWarning", "__version__"]
