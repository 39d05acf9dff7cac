"""The one exception family of sdlite: every error a user can cause carries a one-line message."""


class SdliteError(Exception):
    """Base class: the message is meant for the user, in one line."""


class CheckpointError(SdliteError):
    """A checkpoint file or folder is missing, unreadable, corrupt or of an unsupported kind."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but is not an SD v1.x model (SD 2.x, SDXL, ...)."""


class InputError(SdliteError):
    """A run option or input (size, steps, image, mask, ...) is invalid."""
