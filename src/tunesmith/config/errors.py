"""The two exceptions every layer raises for the CLI to print as one line (no torch import)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (config, data, paths): printed as one line, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf (or fp16 scaling kept failing): training stops before the update.

    Printed as one line with exit code 1 (not the user's input, yet their way out is named); defined
    here, with no torch import, so the CLI can catch it by type without importing the training stack.
    """
