"""The reference training loop (``mdk train``, ``mdk demo``): the configuration, the loss of each method, teachers
and their cached data, checkpoints and resume."""
