"""Named errors of the engine. Each message says what is wrong and what to do about it."""


class RetracError(Exception):
    """Base of every error retrac raises on purpose (bad input, stale data, mismatches)."""


class DatasetError(RetracError):
    """A dataset source cannot be read or does not fit the requested shape."""


class CheckpointError(RetracError):
    """A checkpoint cannot be loaded, or does not match the architecture or loss expected."""


class ReplayError(RetracError):
    """The replay record does not cover what was asked of it."""


class SpecError(RetracError):
    """A spec is inconsistent with the data or checkpoints it names."""


class EvaluationError(RetracError):
    """Inputs of an evaluation metric or experiment do not fit together (shapes, groups, settings)."""


class GradientError(RetracError):
    """A gradient came out non-finite: the message names the parameter, the sample and the dtype."""
