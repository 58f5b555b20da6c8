"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class TinyMLaaSError(Exception):
    """Base class: the message says what went wrong and why, in one line."""


class InvalidModel(TinyMLaaSError):
    pass


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
