"""sdlite: a from-scratch, faithful, memory-lean Stable Diffusion v1.x inference engine."""

from .errors import CheckpointError, InputError, SdliteError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "open_checkpoint", "export_checkpoint",
    "ModelConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "SD_V1", "SD_V1_INPAINT", "TINY",
    "SdliteError", "CheckpointError", "UnsupportedModelError", "InputError",
]

# Imported on first use, so that `import sdlite` (and the `sdlite` command's start, its --help,
# a Ctrl-C in its first second) does not wait for torch.
_LAZY = {"Checkpoint": "checkpoint", "open_checkpoint": "checkpoint", "export_checkpoint": "checkpoint",
         **{name: "config" for name in ("ModelConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "SD_V1",
                                        "SD_V1_INPAINT", "TINY")}}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule: `import sdlite; sdlite.config.TINY`
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
