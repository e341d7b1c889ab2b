"""Exceptions.  Every error a user can cause is an MlsemError naming the
column, value, option or token at fault."""


class MlsemError(ValueError):
    """Bad input or an unsupported request."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped without meeting its convergence criteria."""


class PerformanceWarning(UserWarning):
    """mlsem runs a slower path than it could (e.g. the NumPy oracle because
    the compiled kernel could not be imported)."""


class RankDeficiencyWarning(UserWarning):
    """Design columns of the fixed part were dropped because they are linear
    combinations of earlier columns (as lme4 drops them)."""
