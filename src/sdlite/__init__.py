"""sdlite: a from-scratch, faithful, memory-lean Stable Diffusion v1.x inference engine."""

from .checkpoint import Checkpoint, export_checkpoint, open_checkpoint
from .config import SD_V1, SD_V1_INPAINT, TINY, CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, InputError, SdliteError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "open_checkpoint", "export_checkpoint",
    "ModelConfig", "UNetConfig", "VAEConfig", "CLIPTextConfig", "SD_V1", "SD_V1_INPAINT", "TINY",
    "SdliteError", "CheckpointError", "UnsupportedModelError", "InputError",
]
