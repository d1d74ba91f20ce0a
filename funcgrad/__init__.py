"""funcgrad: neural networks as pure functions in JAX, with hand-derived derivatives cross-checked.

Submodules:
    nn            layers and models as (init, apply, backward) over parameter pytrees
    initializers  the book's 0.01·N(0, 1), Glorot, He, zeros
    losses        cross-entropies, MSE, MAE, L1/L2 penalties (shape-checked)
    metrics       accuracy, binary accuracy, the book's regression accuracy
    data          the book's spiral, vertical and sine data sets (JAX keys, or bit-exact nnfs mode)
    rules         the catalog of hand-derived backward formulas, forward and backward side by side
    verify        three-way gradient checks: autodiff vs hand formulas vs finite differences
    testing       pytest helpers that fail with the check's table
    optim         the book's SGD (momentum), Adagrad, RMSprop and Adam as optax transformations
    train         a pytree train state, jit-compiled and lax.scan-fused steps
    config        TOML configs as validated dataclasses, built into a run
    checkpoint    checkpoints as bytes (npz, no pickle)
    parallel      data parallelism over devices and processes with jax.sharding
    Objective     a model + loss + regularisation, with the book's hand-derived gradient
"""

from funcgrad import checkpoint as checkpoint
from funcgrad import config as config
from funcgrad import data as data
from funcgrad import experiment as experiment
from funcgrad import initializers as initializers
from funcgrad import losses as losses
from funcgrad import metrics as metrics
from funcgrad import nn as nn
from funcgrad import optim as optim
from funcgrad import parallel as parallel
from funcgrad import rules as rules
from funcgrad import testing as testing
from funcgrad import train as train
from funcgrad import verify as verify
from funcgrad.objective import Objective as Objective

__version__ = "0.1.0"

__all__ = [
    "Objective",
    "checkpoint",
    "config",
    "data",
    "experiment",
    "initializers",
    "losses",
    "metrics",
    "nn",
    "optim",
    "parallel",
    "rules",
    "testing",
    "train",
    "verify",
]
