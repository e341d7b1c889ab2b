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


# appended to "has infinite or NaN values": in a Polars frame NaN is a value, not a
# missing one (pandas and R treat it as missing; mlsem reads pandas' NaN as missing)
NAN_HINT = (" (a NaN in a Polars frame is a number, not a missing value: "
            "df.fill_nan(None) makes it missing)")
