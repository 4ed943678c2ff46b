"""Measured fwd+bwd times of the Triton and CUDA C++ backends per GPU, dtype and shape, written by
``python -m bench.tune_dispatch`` from the benchmark CSV of a GPU run (read by :mod:`mdkernels.backends`).

Empty until a GPU session has measured both backends: ``backend="auto"`` then picks Triton on CUDA.
"""

ROWS: list[dict] = []
