"""funcgrad: neural networks as pure functions in JAX, with hand-derived derivatives cross-checked.

Submodules:
    nn            layers and models as (init, apply, backward) over parameter pytrees
    initializers  the book's 0.01·N(0, 1), Glorot, He, zeros
    losses        cross-entropies, MSE, MAE, L1/L2 penalties (shape-checked)
    metrics       accuracy, binary accuracy, the book's regression accuracy
    data          the book's spiral, vertical and sine data sets (JAX keys, or bit-exact nnfs mode)
    rules         the catalog of hand-derived backward formulas, forward and backward side by side
"""

from funcgrad import data as data
from funcgrad import initializers as initializers
from funcgrad import losses as losses
from funcgrad import metrics as metrics
from funcgrad import nn as nn
from funcgrad import rules as rules

__version__ = "0.1.0"

__all__ = [
    "data",
    "initializers",
    "losses",
    "metrics",
    "nn",
    "rules",
]
