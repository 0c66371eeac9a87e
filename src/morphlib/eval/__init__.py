"""Evaluation: corpus windows (``corpus``), quality metrics (``metrics``), statistics (``stats``)."""
