"""Calibrator layer: MarkovCalibrator (a DSPy teleprompter), its resumable trace store and its report."""
