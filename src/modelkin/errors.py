"""The one error hierarchy of modelkin: user errors carry what went wrong, where, and how to fix it."""

from __future__ import annotations


class ModelkinError(Exception):
    """Base of every error modelkin raises for bad input or an unusable environment.

    The CLI prints ``str(err)`` as one line and exits 2; no traceback is shown.

    Args:
        message: what went wrong and where (a path, a tensor name, a config key).
        hint: how to fix it, appended as ``"; fix: …"``.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = " ".join(str(message).split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message


class CheckpointError(ModelkinError):
    """A checkpoint file or directory is missing, malformed, truncated or of an unknown format."""


class ConfigError(ModelkinError):
    """config.json (or GGUF metadata) is missing a field, contradicts itself or the tensors."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's model_type / architecture is not one modelkin implements."""


class DeviceError(ModelkinError):
    """A requested device or backend is not available and fallback was not allowed."""


class TokenizerError(ModelkinError):
    """No usable tokenizer, or text that cannot be tokenized."""


class InputError(ModelkinError):
    """A bad argument: prompt too long, unreadable prompt file, empty set, bad option value."""


class NumericalError(ModelkinError):
    """NaN or Inf where a finite number is required (e.g. logits during generation)."""
