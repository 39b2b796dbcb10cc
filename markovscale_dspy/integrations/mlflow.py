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
from collections.abc import Iterator
from contextlib import contextmanager

import dspy

__all__ = ["autolog_compile", "follow_autolog"]

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


@contextmanager
def autolog_compile(name: str) -> Iterator[None]:
    """Around a calibration MLflow's patch does not reach (``acompile``: autolog patches ``compile`` only), what the
    patch does: a run named ``name`` when ``log_compiles`` is on and none is active, and no traces of the calls
    inside unless ``log_traces_from_compile`` (MLflow's DSPy callback is left out of this block's calls only)."""
    if "mlflow.dspy" not in sys.modules:
        yield
        return
    import mlflow
    from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config

    if autologging_is_disabled("dspy"):
        yield
        return
    started = bool(get_autologging_config("dspy", "log_compiles", False)) and mlflow.active_run() is None
    if started:
        mlflow.start_run(run_name=name)
    callbacks = dspy.settings.get("callbacks", []) or []
    if not get_autologging_config("dspy", "log_traces_from_compile", False):
        callbacks = [c for c in callbacks if type(c).__name__ != "MlflowCallback"]
    try:
        with dspy.context(callbacks=callbacks):
            yield
    except BaseException:
        if started:
            mlflow.end_run(status="FAILED")
            started = False
        raise
    finally:
        if started:
            mlflow.end_run()
