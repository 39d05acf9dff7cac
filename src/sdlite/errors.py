"""The one exception family of sdlite: every error a user can cause carries a one-line message."""


class SdliteError(Exception):
    """Base class: the message is meant for the user, in one line."""


class CheckpointError(SdliteError):
    """A checkpoint file or folder is missing, unreadable, corrupt or of an unsupported kind."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but is not an SD v1.x model (SD 2.x, SDXL, ...)."""


class InputError(SdliteError):
    """A run option or input (size, steps, image, mask, ...) is invalid."""


# What allocators say when memory runs out: CUDA and the CPU allocator on Linux/macOS, and on Windows.
OOM_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or an allocator's RuntimeError
    (told by its type name and message, so that this module needs no torch)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES))
