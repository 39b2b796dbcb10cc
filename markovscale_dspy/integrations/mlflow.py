"""MLflow's DSPy autolog, whichever of it and this package comes first.

``mlflow.dspy.autolog()`` patches ``compile`` on the ``Teleprompter`` subclasses that exist when it runs: that
patch is what opens the run a compile logs to and keeps compile-time calls out of the traces. Called after DSPy's
optimizers are defined but before ``MarkovCalibrator`` is, it would leave our calibrations unlogged and traced call
by call. :func:`follow_autolog` re-applies the user's autolog settings once our optimizers exist. MLflow is never
imported here: a user who turned autolog on has already imported it.
"""

from __future__ import annotations

import inspect
import logging
import sys

__all__ = ["follow_autolog"]

logger = logging.getLogger(__name__)


def follow_autolog() -> bool:
    """Re-apply MLflow's DSPy autolog with its current settings if it is on; returns whether it did."""
    if "mlflow.dspy" not in sys.modules:
        return False
    try:
        from mlflow.dspy import autolog
        from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS, autologging_is_disabled

        if autologging_is_disabled("dspy"):
            return False
        config = AUTOLOGGING_INTEGRATIONS.get("dspy") or {}
        accepted = inspect.signature(autolog).parameters
        autolog(**{key: value for key, value in config.items() if key in accepted})
        return True
    except Exception as exc:  # the user's MLflow, not our calibration: say it, do not fail the import
        logger.warning("MLflow autolog is on but could not be extended to MarkovCalibrator: %s", exc)
        return False
