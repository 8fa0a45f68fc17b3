"""Sparse training: layer budgets, masks, schedules and methods.

`METHODS` names the methods once, torch-free, so a recipe validates `[sparsity] method` without importing
the schedules; `sparse.schedules` registers one schedule per name (a test checks they agree).
"""

METHODS = ("dense", "static", "set", "rigl", "gmp", "ndsnn", "lth")  # in the order shown to users
