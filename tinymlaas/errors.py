"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class TinyMLaaSError(Exception):
    """Base class: the message says what went wrong and why, in one line."""


class InvalidModel(TinyMLaaSError):
    pass


class InvalidCalibration(InvalidModel):
    """Calibration samples that do not fit the model (unreadable, unnamed inputs, other shapes)."""


class UnsupportedOperator(TinyMLaaSError):
    def __init__(self, ops: list[str], model: str):
        self.ops = sorted(set(ops))
        super().__init__(f"{model}: unsupported operator(s): {', '.join(self.ops)}")


class UnknownTarget(TinyMLaaSError):
    pass


class ModelTooLarge(TinyMLaaSError):
    pass


class EmulatorTimeout(TinyMLaaSError):
    pass


class EmulatorFailure(TinyMLaaSError):
    pass


class ToolMissing(TinyMLaaSError):
    pass


class BuildFailure(TinyMLaaSError):
    pass


class InternalError(Exception):
    """A bug of ours (not the user's input): the CLI reports it on one line with the stage and operator."""

    def __init__(self, stage: str, operator: str | None, cause: BaseException):
        self.stage, self.operator, self.cause = stage, operator, cause
        at = f" at operator {operator}" if operator else ""
        detail = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
        super().__init__(f"internal error in stage {stage}{at}: {type(cause).__name__}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # rebuilt from its arguments: a search worker's failure crosses a process boundary
        cause = self.cause if _picklable(self.cause) else RuntimeError(f"{type(self.cause).__name__}: {self.cause}")
        return (type(self), (self.stage, self.operator, cause))


def _picklable(value) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - anything pickle refuses
        return False
