"""txt2img, img2img and inpainting, composed from small steps:
encode_prompt -> prepare_latents -> denoise -> decode.

Random draws follow the references exactly: image i of a batch owns a CPU generator seeded with
seed + i (the AUTOMATIC1111 convention), and each generator is consumed in diffusers' order
(posterior sample of the init image, x_T noise, posterior sample of the masked image, then the
per-step noise of ancestral samplers). x_T is drawn in float32 on the CPU and then moved to the
device, so a seed gives the same image as CompVis and diffusers (CPU generator) on any device.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import random
import re
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from . import attention as attn
from . import images as imgs
from . import parking, precision, samplers, schedule, tiling
from .checkpoint import Checkpoint, no_vae_message, open_checkpoint
from .parking import HostCopy
from .precision import compute_in
from .errors import CheckpointError, InputError, SdliteError
from .tokenizer import get_tokenizer
from .vaefile import build_vae, fit_vae, read_vae_tensors, vae_name

Callback = Callable[[int, int, torch.Tensor], None]


def _uses_attention_setting(method):
    """Run a generation method under this object's attention mode (the setting is per thread, so
    the lower-level steps called on their own use the calling thread's)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with attn.attention_mode(self.attention.mode, self.attention.chunk):
            return method(self, *args, **kwargs)
    return wrapper


@dataclass
class Result:
    """Generated images and, for each, the exact parameters that reproduce it."""

    images: list[Image.Image]
    params: list[dict] = field(default_factory=list)
    latents: torch.Tensor | None = None  # final VP latents (B, 4, h, w), float32, before decoding


@dataclass
class _Job:
    """What one generation call asked for, after validation."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    karras: bool
    clip_skip: int
    eta: float
    generators: list[torch.Generator] = field(default_factory=list)


def _optional_bool(name: str, value):
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{name} must be True, False or None, got {value!r}")
    return value


def _channels_last(requested: bool | None, device: torch.device, quantize: str) -> bool:
    """The UNet's layout: NHWC when asked, and by default for a float UNet on CUDA."""
    _optional_bool("channels_last", requested)
    if requested and device.type != "cuda":
        raise InputError("channels_last=True needs device='cuda'")
    return device.type == "cuda" and quantize == "none" if requested is None else requested


# In low mode on CUDA the two CFG halves run as one call up to this many latent positions per
# half (one 512x512 image; batch_size images count together). Estimated on the CPU for SD v1.5,
# low + int8, fp16 (benchmarks/cuda_memory_estimate.py): the denoise peak grows from 0.88 to
# 0.94 GiB at 512x512 but from 1.06 to 1.30 GiB at 1024x1024. One call per step instead of two
# dequantizes the int8 weights once, and a batch-1 call at 512x512 is too small to fill a big
# GPU (the H100 ran the fp16 UNet at 12.9 ms per batch-2 call; low + int8, two batch-1 calls
# with the old dequantization, took 36 ms per step). On the CPU low mode always splits them:
# the calls are compute-bound there, so splitting costs little time, and float32 activations
# are twice as large. MPS shares the host's memory, so it is treated like the CPU.
LOW_CFG_BATCH_MAX_LATENT = 64 * 64


COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_device(device) -> torch.device:
    """torch.device(device), or a one-line InputError for a name torch does not know or a
    device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; e.g. 'cpu', 'cuda', 'cuda:1', 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available (no NVIDIA GPU, or a CPU-only torch build)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device {device!r}: Apple MPS is not available on this machine")
    return dev


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise InputError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


# Fast mode on CUDA compiles the UNet with torch.compile. "unet": the whole call is traced into
# one graph. "blocks": each ResBlock and SpatialTransformer is compiled alone; blocks of equal
# shapes share one compiled graph (20 graphs for SD v1's 38 blocks under the paired guidance
# call) and the glue between them runs eager under the CUDA graph. CPU proxy (SD v1.5 UNet,
# 256x256, inductor, empty caches; benchmarks/compile_time.py): first call 80.1 s whole vs 67.8 s
# by blocks. Not yet measured on a GPU (warm-up and per-call speed: `bash
# benchmarks/device_run.sh warmup1024`), so "unet" stays the default.
FAST_COMPILE_SCOPES = ("unet", "blocks")
FAST_COMPILE_SCOPE = "unet"
# Dynamo keeps this many compiled versions per function (default 8: the whole UNet compiles for
# up to 8 image sizes). "blocks" needs one per distinct block shape per size (SD v1: 15 for
# ResBlock.forward, 5 for SpatialTransformer.forward), so 8 sizes need 120.
BLOCK_RECOMPILE_LIMIT = 128
# torch.compile keeps compiled graphs and Triton kernels on disk under TORCHINDUCTOR_CACHE_DIR,
# by default a folder in the temp directory, which most Linux systems empty at boot.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE_FOLDER = "torch-compile"  # under metadata.cache_dir()

MEMORY_MODES = ("normal", "low", "high")
ETA_SAMPLERS = ("ddim", "euler_a")  # the samplers that take an eta (the others have no noise to scale)
QUANTIZE_MODES = ("none", "int8")
COMPONENT_ATTRS = {"text": "text_encoder", "unet": "unet", "vae": "vae"}
# Parts of a parked model that go to the device on their own (parameter name prefixes): the
# VAE's decoder is not needed to encode an image, nor its encoder to decode one.
PARK_PARTS = {"vae": {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}}


def compile_unet(unet: torch.nn.Module, scope: str = "unet") -> torch.nn.Module:
    """torch.compile a UNet in place, whole ("unet") or block by block ("blocks"; see
    FAST_COMPILE_SCOPE). Compilation happens on the first call. "blocks" raises dynamo's
    recompile limit to at least BLOCK_RECOMPILE_LIMIT, for the process (torch < 2.12) or for
    this thread and each thread that calls the UNet (torch >= 2.12, where the limit is per thread)."""
    if scope not in FAST_COMPILE_SCOPES:
        raise InputError(f"compile scope must be one of {', '.join(FAST_COMPILE_SCOPES)}, got {scope!r}")
    if scope == "unet":
        unet.forward = torch.compile(unet.forward, dynamic=False)
        return unet
    from .unet import ResBlock, SpatialTransformer

    _raise_recompile_limit()
    for module in unet.modules():
        if isinstance(module, (ResBlock, SpatialTransformer)):
            module.compile(dynamic=False)
    forward = unet.forward

    def forward_raising_limit(*args, **kwargs):
        # Since torch 2.12 dynamo's config is per thread: a UNet built in one thread and run in
        # another (a web UI's worker) would meet the default limit there and run blocks eager.
        _raise_recompile_limit()
        return forward(*args, **kwargs)

    unet.forward = forward_raising_limit
    return unet


def persistent_compile_cache() -> Path | None:
    """Keep torch.compile's on-disk cache in sdlite's cache folder (~/.cache/sdlite/torch-compile)
    instead of torch's default in the temp directory, so that fast mode's compiled UNet outlives
    a reboot: a first call on the cache compiles nothing (SD v1.5 at 256x256 on a 2-core CPU:
    9.0 s instead of 80.1 s, benchmarks/compile_time.py). Left alone when TORCHINDUCTOR_CACHE_DIR
    names another folder (the user's choice) or this one cannot be made. Returns the folder it
    set, else None."""
    current = os.environ.get(COMPILE_CACHE_ENV)
    if current is not None:
        # Importing dynamo (as any torch.compile does) sets the variable to torch's default.
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        except ImportError:  # older torch: keep whatever is set
            return None
        if os.path.abspath(current) != os.path.abspath(default_cache_dir()):
            return None
    from .metadata import cache_dir

    folder = cache_dir() / COMPILE_CACHE_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # torch's default then, which it creates itself
    os.environ[COMPILE_CACHE_ENV] = str(folder)
    return folder


def recompile_limit_setting() -> tuple[object, str]:
    """(dynamo's config, the name of its recompile limit: "cache_size_limit" before torch 2.6)."""
    from torch._dynamo import config

    return config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


def _raise_recompile_limit() -> None:
    """Lift dynamo's recompile limit (in this thread, on torch >= 2.12) to BLOCK_RECOMPILE_LIMIT."""
    config, name = recompile_limit_setting()
    if getattr(config, name) < BLOCK_RECOMPILE_LIMIT:
        setattr(config, name, BLOCK_RECOMPILE_LIMIT)


class StableDiffusion:
    """A Stable Diffusion v1.x model ready to generate.

    `StableDiffusion("model.safetensors")` accepts CompVis .ckpt/.safetensors files and
    diffusers folders.

    - `device`: "cpu" (default), "cuda", "mps", ...
    - `dtype`: the compute dtype; float32 on CPU and float16 on GPUs by default. On the CPU,
      weights stored in fp16/bf16 stay in their stored dtype and each layer computes in `dtype`
      (no full-precision copy of the UNet or text encoder; the VAE, run once per image, is packed
      from its float32 form for oneDNN, up to 198 MB for SD's decoder, except for the 3x3
      convolutions that run by Winograd on large maps, which convert per call).
    - `memory`: "normal" keeps the three models loaded for repeated generation; on CUDA the
      UNet stays on the GPU while the text encoder and VAE wait in pinned host memory between
      their stages, and of the VAE only the half that runs goes to the GPU (parking.py: 0.39
      GiB less GPU memory while denoising for SD v1 in fp16, for about 0.3 GiB of host-to-GPU
      copies per image). "high" keeps all three on the device (on the CPU and MPS it is
      "normal"). "low" keeps at most one resident: text encoder, then UNet, then VAE, each
      loaded from the (memory-mapped) checkpoint when needed and freed after use; it also runs
      the two halves of classifier-free guidance as two calls (half the UNet activations; on
      CUDA only above one 512x512 image, see `cfg_batch`), and on glibc it fixes malloc's thresholds
      for the whole process (during the UNet stage blocks below 9 MiB come from the heap and are
      reused; the heap is trimmed when each stage ends: `_malloc_for_low_memory`).
    - `cfg_batch`: True runs the two halves of classifier-free guidance as one batch-2 UNet
      call (the latent once with both contexts: the layers before the first cross-attention
      run once), False as two calls (half the activations, same result within float rounding).
      None (default): one call, except in low mode, where the halves split on the CPU and MPS,
      and on CUDA above one 512x512 image (width x height x batch_size).
    - `channels_last`: the UNet's convolutions in NHWC (cuDNN's own layout; about 20 % faster
      on an H100). None (default) = on for a float UNet on CUDA; CUDA only.
    - `vae`: a standalone VAE file (.safetensors/.ckpt, CompVis or diffusers layout) or a
      diffusers vae/ folder, used instead of the checkpoint's VAE (e.g. vae-ft-mse-840000);
      required by checkpoints shipped without VAE weights. Checked to fit when given.
    - `fast`: opt-in speed that changes the arithmetic: on CUDA torch.compile (+ CUDA graphs),
      on the CPU int8 x int8 UNet products (fastcpu.py; the UNet is held in int8). Exact mode
      (the default) keeps the reference's results within float rounding.
    """

    def __init__(self, model: str | Path | Checkpoint, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, ema: bool = False, memory: str = "normal",
                 quantize: str = "none", attention: str = "sdpa", attention_chunk: int | None = None,
                 vae_tiling: str = "auto", cuda_graphs: bool | None = None, fast: bool = False,
                 channels_last: bool | None = None, cfg_batch: bool | None = None,
                 vae: str | Path | None = None):
        if memory not in MEMORY_MODES:
            raise InputError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if quantize not in QUANTIZE_MODES:
            raise InputError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if vae_tiling not in tiling.TILINGS:
            raise InputError(f"vae_tiling must be one of {', '.join(tiling.TILINGS)}, got {vae_tiling!r}")
        with attn.attention_mode(attention, attention_chunk) as setting:  # validates the options
            self.attention = setting
        self.quantize, self.vae_tiling = quantize, vae_tiling
        self.checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model, ema=ema)
        self.device = check_device(device)
        self.dtype = _check_dtype(dtype) or _default_dtype(self.device)
        self.storage_dtype = None  # set when a reduced compute dtype falls back to float32
        self._check_cpu_dtype()
        self.memory = memory
        self.cfg_batch = _optional_bool("cfg_batch", cfg_batch)  # None: see _batches_cfg
        # CUDA graphs replay the same kernels (exact mode), so they are on by default on CUDA.
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise InputError("cuda_graphs=True needs device='cuda'")
        # NHWC UNet: cuDNN's own layout, no transposes around each convolution (H100, fp16, 512x512:
        # 10.2 instead of 12.9 ms per UNet call; images 80 dB PSNR from NCHW). int8: not measured.
        self.channels_last = _channels_last(channels_last, self.device, quantize)
        self.fast = fast
        if fast and self.device.type == "cpu" and not self._fast_cpu:
            warnings.warn("fast mode on the CPU needs oneDNN's int8 operators and float32 compute; "
                          "running exact mode", stacklevel=2)
        elif fast and self.device.type not in ("cpu", "cuda"):
            warnings.warn(f"fast mode has no {self.device.type} path; running exact mode", stacklevel=2)
        self.config = self.checkpoint.config
        # the VAE file's tensors, read to check it, are used by its first load (then dropped)
        self.vae_file, self._vae_tensors = self._check_vae_file(vae)
        self.text_encoder = self.unet = self.vae = None
        self.tokenizer = get_tokenizer()
        self.alphas_cumprod = schedule.alphas_cumprod()
        # From now on each component is loaded through its own memory map, so a model that is
        # freed (or converted to another dtype) gives its pages back.
        if self.checkpoint.memory_mapped:
            self.checkpoint.release()
        if memory == "low":
            _malloc_for_low_memory()
        self._parked: dict[str, HostCopy] = {}
        self._replaced: dict[str, torch.nn.Module] = {}  # replace()d models, by component
        if memory != "low":
            for component in COMPONENT_ATTRS:
                self._loaded(component)
        self._vae_tensors = None  # low mode: read again at each decode

    def _check_vae_file(self, vae: str | Path | None) -> tuple[Path | None, dict | None]:
        """(path, tensors) of the `vae` file, checked to fit the model; config.vae becomes its
        architecture. A checkpoint without VAE weights needs one."""
        if vae is None:
            if not self.checkpoint.has_vae:
                raise CheckpointError(no_vae_message(self.checkpoint.path))
            return None, None
        if not isinstance(vae, (str, os.PathLike)):
            raise InputError(f"vae must be a path to a VAE file or folder, got {type(vae).__name__}")
        path = Path(vae).expanduser()
        tensors = read_vae_tensors(path)
        self.config = replace(self.config, vae=fit_vae(path, tensors, self.checkpoint))
        return path, tensors

    def load_component(self, component: str) -> torch.nn.Module:
        """Load one model from the checkpoint (the VAE from `vae_file` when given) for this
        device and compute dtype."""
        if component == "vae" and self.vae_file is not None:
            tensors, self._vae_tensors = self._vae_tensors, None
            tensors = read_vae_tensors(self.vae_file) if tensors is None else tensors
            stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
            load_dtype, wrap = self._load_dtype(stored)
            # config.vae is the file's, checked when the pipeline was made
            model = build_vae(self.config.vae, tensors, self.load_device("vae"), load_dtype)
            del tensors
            # the file was read for this load alone: its pages can go once the weights are packed
            return self.prepare("vae", compute_in(model, self.dtype) if wrap else model, release=True)
        load_dtype, wrap = self._load_dtype(self.checkpoint.dtype)
        # quantized while loading; an int8 file is used as it is
        int8 = self.quantize == "int8" or (component == "unet" and self._fast_cpu)
        model = self.checkpoint.load(component, load_dtype, self.load_device(component), int8=int8)
        model = compute_in(model, self.dtype) if wrap else model
        # The re-packed weights' file pages can be dropped when they are this load's own memory
        # map (a released checkpoint); drop_pages leaves memory that is not a file mapping alone
        # (e.g. weights converted to another dtype while loading).
        return self.prepare(component, model, release=self.checkpoint.tensors is None)

    def _load_dtype(self, stored: torch.dtype) -> tuple[torch.dtype | None, bool]:
        """(dtype to load weights stored in `stored` in, None = as stored; whether the model then
        computes in self.dtype layer by layer). On the CPU, fp16/bf16-stored weights stay as
        stored under float32 compute (no full-precision copy)."""
        keep_stored = self.device.type == "cpu" and stored != self.dtype and stored in (torch.float16, torch.bfloat16) \
            and self.dtype == torch.float32
        # float32 compute chosen over a slow reduced dtype: the weights are stored in that dtype
        load_dtype = None if keep_stored else (self.storage_dtype or self.dtype)
        return load_dtype, keep_stored or self.storage_dtype is not None

    def prepare(self, component: str, model: torch.nn.Module, release: bool = False) -> torch.nn.Module:
        """The run-time speed-ups for a loaded model (also for one loaded elsewhere, e.g. a VAE
        file): exact CPU kernels (packed oneDNN weights, upsampling as one transposed conv;
        `release`: its weights are file-mapped pages that may be dropped once packed) in normal
        mode, and for the VAE in every mode, also from fp16/bf16-stored weights; CUDA graphs /
        torch.compile for the UNet."""
        if self.device.type == "cpu" and (self.memory != "low" or component == "vae"):
            from .kernels import cpu_speed_up

            # The VAE runs once per image, so low mode packs it too, also from fp16/bf16-stored
            # weights (their float32 form, up to 198 MB for SD's decoder; 512x512 decode
            # 12.7 -> ~8 s; Winograd layers convert per call instead: ~5.5 s).
            cpu_speed_up(model, release=release, stored=component == "vae")
        if component == "unet" and self._fast_cpu:
            from .fastcpu import fast_int8

            fast_int8(model)
        if component == "unet":
            model = self._speed_up(model)
        return model

    @property
    def _fast_cpu(self) -> bool:
        """Fast mode's CPU path (int8 x int8 oneDNN products in the UNet) applies."""
        from .fastcpu import available

        return self.fast and self.device.type == "cpu" and self.dtype == torch.float32 and available()

    @property
    def compiles_unet(self) -> bool:
        """Fast mode on CUDA: the UNet is torch.compiled, on its first call at each input shape."""
        return self.fast and self.device.type == "cuda"

    def _speed_up(self, unet: torch.nn.Module) -> torch.nn.Module:
        """Exact-mode CUDA graphs; fast mode adds torch.compile (different kernels, PSNR-checked)."""
        if self.channels_last or self.compiles_unet:
            unet = unet.to(memory_format=torch.channels_last)
        if self.compiles_unet:
            persistent_compile_cache()
            compile_unet(unet, FAST_COMPILE_SCOPE)
        if self.cuda_graphs:
            from .cudagraph import GraphedUNet

            unet = GraphedUNet(unet)
        return unet

    def _check_cpu_dtype(self) -> None:
        """A reduced compute dtype that this CPU only emulates becomes float32 compute (weights
        stored in the reduced dtype, computed layer by layer), with a warning."""
        if self.device.type != "cpu" or self.dtype not in (torch.float16, torch.bfloat16):
            return
        slowdown = precision.cpu_slowdown(self.dtype)
        if slowdown > precision.CPU_SLOWDOWN_LIMIT:
            name = str(self.dtype).removeprefix("torch.")
            warnings.warn(f"{name} compute is {slowdown:.0f}x slower than float32 on this CPU (no native {name} "
                          f"instructions): computing in float32, weights stored in {name}", stacklevel=3)
            self.dtype, self.storage_dtype = torch.float32, self.dtype

    def load_device(self, component: str) -> torch.device:
        """Where a component is loaded: a parked model into host memory (it reaches the device
        only for its stage), the others onto the device."""
        return torch.device("cpu") if self._parks(component) else self.device

    def replace(self, component: str, model: torch.nn.Module) -> None:
        """Use `model` (loaded with `load_device` and `prepare`) for a component from now on.
        In low memory mode the pipeline keeps it between its stages (it cannot be read from the
        file again), so it stays in memory the whole time, beside each stage's model."""
        attr = _component_attr(component)
        self._replaced[component] = model
        if self.memory == "low":
            setattr(self, attr, None)  # given to its stage when the stage comes
            return
        setattr(self, attr, model)
        self._loaded(component)  # a parked component is parked at once

    def _parks(self, component: str) -> bool:
        """This component waits in host memory between its stages (memory="normal" on CUDA)."""
        return self.memory == "normal" and component in ("text", "vae") and parking.parks(self.device)

    def _loaded(self, component: str) -> torch.nn.Module:
        """The model for a component, loaded if needed (and parked, if it parks)."""
        attr = _component_attr(component)
        model = getattr(self, attr)
        if model is None:
            model = self._replaced[component] if component in self._replaced else self.load_component(component)
            setattr(self, attr, model)
        if self._parks(component):
            parked = self._parked.get(component)
            # new, replaced (e.g. another VAE), or its layers were swapped (e.g. quantized in place)
            if parked is None or parked.model is not model or parked.stale():
                self._parked[component] = HostCopy(model, PARK_PARTS.get(component))
        return model

    def resident(self, component: str, part: str | None = None) -> torch.nn.Module:
        """The model for a component, loaded if needed and on the device (of a parked model,
        only `part` of it if given: a key of PARK_PARTS[component])."""
        if part is not None and part not in PARK_PARTS.get(component, {}):
            parts = ", ".join(PARK_PARTS.get(component, {})) or "none"
            raise InputError(f"unknown part {part!r} of {component!r} (its parts: {parts})")
        if self.memory == "low" and getattr(self, _component_attr(component)) is None:
            _give_back_freed_memory()  # also what the last stage freed after its end
            _malloc_for_low_memory(component)
        model = self._loaded(component)
        if self._parks(component):
            self._parked[component].to_device(self.device, part)
        return model

    def done_with(self, component: str) -> None:
        """A model's stage is over: in low-memory mode free it; a parked one goes back to host memory."""
        _component_attr(component)  # a known name
        if self.memory == "low":
            setattr(self, _component_attr(component), None)
            gc.collect()
            _malloc_for_low_memory()
            _give_back_freed_memory()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        elif self._parks(component) and component in self._parked:
            self._parked[component].to_host()

    @contextmanager
    def _stage(self, component: str, part: str | None = None) -> Iterator[torch.nn.Module]:
        """The model on the device for a stage; done with it afterwards, also after an error."""
        try:
            yield self.resident(component, part)
        except BaseException as error:
            if self.memory == "low":
                # The finished frames of the traceback (sampler, model forwards, VAE passes) hold
                # the model in their locals: kept with the exception (a notebook's Ctrl-C), they
                # would keep it alive beside the next stage's. Callers bind no model to a local.
                traceback.clear_frames(error.__traceback__)
            raise
        finally:
            self.done_with(component)

    def resident_components(self) -> list[str]:
        return [c for c, attr in COMPONENT_ATTRS.items() if getattr(self, attr) is not None]

    @property
    def is_inpainting_model(self) -> bool:
        return self.config.unet.in_channels == 9

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downscale

    # ------------------------------------------------------------------ steps

    def encode_prompt(self, prompts: list[str], clip_skip: int = 1, what: str = "prompt") -> torch.Tensor:
        """Text -> (B, 77, width) context in the model dtype; warns (once per text) when a `what`
        ("prompt", "negative prompt") was truncated.
        (A parked text encoder stays on the device until `done_with("text")`.)"""
        tokens = [self.tokenizer.tokenize(p) for p in prompts]
        for p, t in dict(zip(prompts, tokens)).items():
            if t.num_truncated:
                warnings.warn(f"{what} truncated to 77 tokens ({t.num_truncated} dropped): {p[:60]!r}", stacklevel=3)
            found = _WEB_UI_SYNTAX.search(p)
            if found:
                warnings.warn(f"{what} has web-UI syntax that sdlite reads as plain text, as the reference does "
                              f"(no attention weights, LoRAs or embeddings): {found.group(0)!r}", stacklevel=3)
        ids = torch.tensor([t.ids for t in tokens], device=self.device)
        with torch.inference_mode():
            return self.resident("text")(ids, clip_skip=clip_skip)

    def noise(self, job: _Job) -> torch.Tensor:
        """One draw of unit noise per image from its own generator, float32 on the CPU."""
        shape = (1, self.config.unet.out_channels, job.height // self.latent_factor, job.width // self.latent_factor)
        return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in job.generators])

    def encode_image(self, image: torch.Tensor, job: _Job) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents, sampling the posterior per generator."""
        out = []
        # Low mode encodes with the plain encoder: its encode stage is far below the denoise peak
        # anyway, and after a streamed encode the denoise stage peaked 0.1 GiB higher in RSS (same
        # tensor bytes: an allocator/oneDNN effect, measured, not understood; see the README).
        stream = self.memory != "low"
        with self._stage("vae", "encoder"), torch.inference_mode():  # the model: self.vae (see _stage)
            for i, g in enumerate(job.generators):
                mean, logvar = tiling.encode(self.vae, image[i : i + 1].to(self.device, self.dtype), self.vae_tiling,
                                             stream=stream, plain=self._plain_vae)
                eps = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(self.device, mean.dtype)
                out.append(mean + torch.exp(0.5 * logvar) * eps)
        # Latent bookkeeping (noise, blending) happens on the CPU in float32, like x_T.
        return torch.cat(out).float().cpu() * self.config.vae.scale_factor

    def denoise(self, x: torch.Tensor, sigmas: torch.Tensor, job: _Job, cond: torch.Tensor,
                uncond: torch.Tensor | None, extra_channels: torch.Tensor | None = None,
                callback: Callback | None = None, known: _KnownRegion | None = None) -> torch.Tensor:
        """Run the sampler from VE latents at sigmas[0]; returns VP latents (float32). `known`:
        an ordinary checkpoint's inpainting keeps the known region at the image."""
        interpolation = samplers.timestep_interpolation(job.sampler, job.karras)
        denoiser = samplers.Denoiser(self._eps, self.alphas_cumprod, interpolation=interpolation,
                                     cfg_batch=self._batches_cfg(x), pairs_contexts=True)
        model = denoiser.bind(cond, uncond, job.guidance_scale, extra_channels)
        if known is not None:
            model, callback = known.model(model), known.callback(callback)
        options = {"eta": job.eta} if job.sampler in ETA_SAMPLERS and job.eta is not None else {}
        with self._stage("unet"), torch.inference_mode():  # the model: self.unet (see _stage)
            if hasattr(self.unet, "forget_if_weights_moved"):  # CUDA graphs read weights at fixed addresses
                self.unet.forget_if_weights_moved()
            x = samplers.get_sampler(job.sampler)(model, x, sigmas, callback=callback,
                                                  noise_sampler=self._noise_sampler(x, job), **options)
        return samplers.to_vp(x, sigmas[-1])

    @property
    def _plain_vae(self) -> bool:
        """Speed before memory (memory="high", or fast mode outside low mode) on CUDA: "auto" VAE
        passes run in one call, untiled and unstreamed, where they fit in free device memory
        (tiling.plain_fits)."""
        return self.device.type == "cuda" and (self.memory == "high" or (self.fast and self.memory != "low"))

    def _batches_cfg(self, latents: torch.Tensor) -> bool:
        """Whether the two CFG halves run as one UNet call (see `cfg_batch`)."""
        if self.cfg_batch is not None:
            return self.cfg_batch
        if self.memory != "low":
            return True
        images, _, height, width = latents.shape
        return self.device.type == "cuda" and images * height * width <= LOW_CFG_BATCH_MAX_LATENT

    def _eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t.to(self.device), context).float()

    def _noise_sampler(self, x: torch.Tensor, job: _Job):
        def draw(sigma, sigma_next):
            return self.noise(job).to(x.device)
        return draw

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VP latents -> images (B, 3, H, W) in [-1, 1], float32; refuses NaN/inf output."""
        z = latents / self.config.vae.scale_factor
        if not torch.isfinite(z).all():
            raise SdliteError("the sampler produced NaN/inf latents (try float32, fewer steps or another sampler)")
        with self._stage("vae", "decoder"), torch.inference_mode():  # the model: self.vae (see _stage)
            image = tiling.decode(self.vae, z.to(self.device, self.dtype), self.vae_tiling, plain=self._plain_vae).float()
            if not torch.isfinite(image).all() and self.dtype != torch.float32:
                warnings.warn("VAE decode gave NaN/inf in reduced precision; retrying in float32", stacklevel=2)
                image = tiling.decode(compute_in(self.vae, torch.float32), z.float().to(self.device), self.vae_tiling,
                                      plain=self._plain_vae).float()
        if not torch.isfinite(image).all():
            raise SdliteError("the VAE decoder produced NaN/inf (broken VAE weights?)")
        return image

    # ------------------------------------------------------------------ jobs

    def _job(self, prompt, negative_prompt, *, width, height, steps, guidance_scale, sampler, karras, seed,
             batch_size, clip_skip, eta) -> _Job:
        if not _is_int(batch_size) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        layers = self.config.text.layers
        if not _is_int(clip_skip) or not 1 <= clip_skip <= layers:
            raise InputError(f"clip_skip must be an integer from 1 to {layers}, got {clip_skip!r}")
        if not _is_texts(prompt):
            raise InputError(f"prompt must be a string or a non-empty list of strings, got {_kind(prompt)}")
        if not isinstance(prompt, str) and batch_size != 1:
            raise InputError(f"batch_size applies to one prompt string; with a list of {len(prompt)} prompts, "
                             "repeat them in the list instead")
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if negative_prompt is not None and not _is_texts(negative_prompt):
            raise InputError("negative prompt must be None, a string or a non-empty list of strings, "
                             f"got {_kind(negative_prompt)}")
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        _check_size(width, height, self.latent_factor)
        schedule.check_steps(steps)
        if not _is_number(guidance_scale) or not math.isfinite(guidance_scale):
            raise InputError(f"guidance scale must be a finite number, got {guidance_scale!r}")
        samplers.get_sampler(sampler)
        if not isinstance(karras, bool):
            raise InputError(f"karras must be True or False, got {karras!r}")
        if eta is not None and sampler not in ETA_SAMPLERS:
            raise InputError(f"eta applies to the {' and '.join(ETA_SAMPLERS)} samplers, not {sampler!r}")
        seed = random.randrange(2**32) if seed is None else seed
        if not _is_int(seed) or seed < 0 or seed + len(prompts) - 1 >= 2**64:
            raise InputError(f"seed must be an integer from 0 to 2**64 - {len(prompts)}, got {seed!r}")
        seeds = [seed + i for i in range(len(prompts))]
        job = _Job(prompts, negatives, seeds, width, height, steps, float(guidance_scale), sampler, karras,
                   clip_skip, eta)
        job.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return job

    def _conditioning(self, job: _Job):
        with self._stage("text"):
            cond = self.encode_prompt(job.prompts, job.clip_skip)
            uncond = None if job.guidance_scale == 1 else self.encode_prompt(job.negatives, job.clip_skip, "negative prompt")
        return cond, uncond

    def _sigmas(self, job: _Job) -> torch.Tensor:
        return samplers.get_sigmas(job.sampler, job.steps, job.karras, alphas_cumprod=self.alphas_cumprod)

    def run_options(self) -> dict:
        """The options of this pipeline that change the image: compute dtype, int8 weights (asked
        for or from an int8 file), fast mode where it applies, EMA weights."""
        return {"dtype": str(self.dtype).removeprefix("torch."),
                "quantize": "int8" if self.quantize == "int8" or self.checkpoint.quantization else "none",
                "fast": self._fast_cpu or self.compiles_unet, "ema": self.checkpoint.ema}

    def _finish(self, latents: torch.Tensor, job: _Job, mode: str, extra: dict) -> Result:
        pictures = imgs.to_pil(self.decode(latents))
        params = []
        for i, seed in enumerate(job.seeds):
            p = {"mode": mode, "prompt": job.prompts[i], "negative_prompt": job.negatives[i], "seed": seed,
                 "steps": job.steps, "sampler": job.sampler, "sampler_label": samplers.sampler_label(job.sampler, job.karras),
                 "karras": job.karras, "cfg_scale": job.guidance_scale, "width": job.width, "height": job.height,
                 "clip_skip": job.clip_skip, "model": self.checkpoint.path.stem, "architecture": self.config.name,
                 "vae": vae_name(self.vae_file) if self.vae_file else None, **self.run_options()}
            if job.eta is not None and job.sampler in ETA_SAMPLERS:
                p["eta"] = job.eta
            params.append({**p, **extra})
        return Result(pictures, params, latents)

    # ------------------------------------------------------------------ public API

    @_uses_attention_setting
    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] | None = "", *, width: int = 512,
                height: int = 512, steps: int = 50, guidance_scale: float = 7.5, sampler: str = "plms",
                karras: bool = False, seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                eta: float | None = None, callback: Callback | None = None) -> Result:
        """Generate images from text. Defaults follow the CompVis txt2img script (PLMS, 50 steps, 7.5)."""
        job = self._job(prompt, negative_prompt, width=width, height=height, steps=steps,
                        guidance_scale=guidance_scale, sampler=sampler, karras=karras, seed=seed,
                        batch_size=batch_size, clip_skip=clip_skip, eta=eta)
        if self.is_inpainting_model:
            raise InputError("this is an inpainting checkpoint (9-channel UNet): use inpaint(), not txt2img()")
        cond, uncond = self._conditioning(job)
        sigmas = self._sigmas(job)
        x = self.noise(job).to(self.device) * samplers.initial_noise_scale(sampler, sigmas)
        return self._finish(self.denoise(x, sigmas, job, cond, uncond, callback=callback), job, "txt2img", {})

    @_uses_attention_setting
    def img2img(self, prompt: str | list[str], init_image, negative_prompt: str | list[str] | None = "", *,
                strength: float = 0.75, width: int | None = None, height: int | None = None, steps: int = 50,
                guidance_scale: float = 7.5, sampler: str = "ddim", karras: bool = False, seed: int | None = None,
                batch_size: int = 1, clip_skip: int = 1, eta: float | None = None,
                callback: Callback | None = None) -> Result:
        """Repaint an image: noise it to `strength` of the schedule and denoise from there.

        The init image (any PIL mode, or a path) is resized to width x height, which default to
        its own size rounded down to multiples of 8.
        """
        image, job = self._image_job(init_image, prompt, negative_prompt, width, height, steps, guidance_scale,
                                     sampler, karras, seed, batch_size, clip_skip, eta)
        sigmas = _truncate(self._sigmas(job), steps, strength)
        if self.is_inpainting_model:
            raise InputError("this is an inpainting checkpoint (9-channel UNet): use inpaint(), not img2img()")
        cond, uncond = self._conditioning(job)
        init = self.encode_image(image.expand(len(job.seeds), -1, -1, -1), job)
        x = (init + self.noise(job) * sigmas[0]).to(self.device)
        latents = self.denoise(x, sigmas, job, cond, uncond, callback=callback)
        return self._finish(latents, job, "img2img", {"strength": strength})

    @_uses_attention_setting
    def inpaint(self, prompt: str | list[str], init_image, mask_image=None, negative_prompt: str | list[str] | None = "",
                *, green_mask: bool = False, strength: float = 1.0, width: int | None = None,
                height: int | None = None, steps: int = 50, guidance_scale: float = 7.5, sampler: str = "ddim",
                karras: bool = False, seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
                eta: float | None = None, callback: Callback | None = None) -> Result:
        """Repaint the masked region (white = repaint) or, with green_mask=True, the pure green pixels.

        9-channel inpainting checkpoints get [latents, mask, masked-image latents] as UNet input;
        ordinary checkpoints blend the known region back into the latents after every step.
        The prompt may be empty.
        """
        pil = imgs.load_image(init_image, "init image")
        mask_pil = _mask_source(pil, mask_image, green_mask)
        image, job = self._image_job(pil, prompt, negative_prompt, width, height, steps, guidance_scale,
                                     sampler, karras, seed, batch_size, clip_skip, eta)
        mask = imgs.mask_to_tensor(mask_pil, job.width, job.height)  # (1, 1, H, W), 1 = repaint
        if not (mask >= 0.5).any():
            warnings.warn("the mask has no white (repaint) pixels at this size: nothing is repainted", stacklevel=2)
        sigmas = _truncate(self._sigmas(job), steps, strength)
        cond, uncond = self._conditioning(job)
        n = len(job.seeds)
        image = image.expand(n, -1, -1, -1)
        need_init = not self.is_inpainting_model or strength < 1
        init = self.encode_image(image, job) if need_init else None
        noise = self.noise(job)
        if strength < 1:
            x = init + noise * sigmas[0]
        else:
            x = noise * samplers.initial_noise_scale(sampler, sigmas)
        masked = self.encode_image(image * (mask < 0.5), job)  # drawn even when unused, as diffusers
        small = torch.nn.functional.interpolate(mask, size=masked.shape[-2:]).expand(n, -1, -1, -1)
        if self.is_inpainting_model:
            extra = torch.cat([small, masked], dim=1).to(self.device)
            latents = self.denoise(x.to(self.device), sigmas, job, cond, uncond, extra, callback=callback)
        else:
            known = _KnownRegion(init, noise, small, sigmas)
            latents = self.denoise(x.to(self.device), sigmas, job, cond, uncond, callback=callback, known=known)
        return self._finish(latents, job, "inpaint", {"strength": strength})

    def _image_job(self, init_image, prompt, negative_prompt, width, height, steps, guidance_scale, sampler,
                   karras, seed, batch_size, clip_skip, eta):
        pil = imgs.load_image(init_image, "init image")
        if width is None or height is None:
            w0, h0 = imgs.default_size(pil)
            width, height = width or w0, height or h0
        job = self._job(prompt, negative_prompt, width=width, height=height, steps=steps,
                        guidance_scale=guidance_scale, sampler=sampler, karras=karras, seed=seed,
                        batch_size=batch_size, clip_skip=clip_skip, eta=eta)
        return imgs.to_tensor(imgs.resize_for(pil, width, height)), job


# glibc's malloc during low memory mode's UNet stage: blocks below this size come from the heap,
# and a freed one is reused by the next tensor instead of fresh zeroed pages being faulted in;
# larger ones get their own mapping, returned to the OS when freed. It covers a 512x512 image's
# activations (5 MiB at batch 1) and one group of a rebuilt weight with oneDNN's re-ordered copy
# (precision.CPU_WEIGHT_GROUP_BYTES each), and not 1024x1024's 21 MiB activations: long-lived
# blocks of that size (the UNet's skip activations) scattered the heap, 1.99 instead of 1.81 GiB
# peak RSS with a 64 MiB threshold. The heap keeps what the stage freed until the stage ends;
# then `_give_back_freed_memory` returns it to the OS. The other stages run once per image and
# keep every block of 128 KiB or more in its own mapping, returned at once.
LOW_MMAP_THRESHOLD = precision.CPU_WEIGHT_GROUP_BYTES + (1 << 20)
LOW_VAE_MMAP_THRESHOLD = 64 << 20
LOW_OTHER_STAGES_THRESHOLD = 128 << 10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _glibc():
    """glibc's C library (for mallopt / malloc_trim), or None elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _malloc_for_low_memory(stage: str | None = None) -> None:
    """Fix glibc's malloc thresholds for memory="low" (process-wide; a no-op off glibc).

    glibc raises its mmap threshold after large frees (up to 32 MiB), so which tensors come from
    the heap drifts, and freed heap memory stays counted between stages: 1.64 GiB peak RSS for
    low + int8 at 512x512, 1.44 GiB with both thresholds fixed at 128 KiB. But at 128 KiB every
    activation is fresh zeroed pages: page faults were a third of a low-mode UNet call on the
    CPU. So the UNet stage ("unet") takes blocks below LOW_MMAP_THRESHOLD from the heap and does
    not trim it while it runs (freed blocks are reused at once). The VAE stage does the same below
    LOW_VAE_MMAP_THRESHOLD: its Winograd convolutions (kernels.py) make a filter transform and
    band buffers per call, up to 38 MB; as fresh pages they cost 3.6 s of a 512x512 decode
    (9.3 vs 5.7 s with reuse) for 0.02 GiB less in that stage, which stays far below the denoise
    peak. The text stage (and no stage) keeps 128 KiB. `done_with` trims the heap when each stage
    ends."""
    libc = _glibc()
    if libc is None:
        return
    if stage in ("unet", "vae"):
        # some glibc builds refuse thresholds above 32 MiB (HEAP_MAX_SIZE / 2): then 32 MiB it is
        if not libc.mallopt(_M_MMAP_THRESHOLD, LOW_MMAP_THRESHOLD if stage == "unet" else LOW_VAE_MMAP_THRESHOLD):
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, LOW_OTHER_STAGES_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, LOW_OTHER_STAGES_THRESHOLD)


def _give_back_freed_memory() -> None:
    """Return the heap's free memory to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _component_attr(component: str) -> str:
    if component not in COMPONENT_ATTRS:
        raise InputError(f"unknown component {component!r}; components: {', '.join(COMPONENT_ATTRS)}")
    return COMPONENT_ATTRS[component]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_texts(v) -> bool:
    """A string, or a non-empty list/tuple of strings."""
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(p, str) for p in v))


def _kind(v) -> str:
    return repr(v) if v is None or isinstance(v, (int, float)) else type(v).__name__


def _check_size(width, height, factor: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
        if v % 8 or v % factor:
            raise InputError(f"{name} {v} is not a multiple of 8 (try {max(8, v - v % 8)} or {v + 8 - v % 8})")


# A1111/ComfyUI prompt syntax with no meaning in the CompVis model: (word:1.2) weights, <lora:...>
# (weights 0-2.x, so "(John 3:16)" or "(ratio 16:9)" are not taken for them)
_WEB_UI_SYNTAX = re.compile(r"\([^()]*[a-z][^()]*:\s*[-+]?(?:[0-2](?:\.\d*)?|\.\d+)\s*\)|\(\([^()]+\)\)"
                            r"|<(?:lora|lyco|lycoris|hypernet):[^>]*>", re.IGNORECASE)


def _truncate(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The reference's img2img truncation: run the last int(steps * strength) steps."""
    if not _is_number(strength) or not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength!r}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InputError(f"strength {strength} with {steps} steps runs no step; raise steps or strength")
    return sigmas[steps - run :]


def _mask_source(image: Image.Image, mask_image, green: bool) -> Image.Image:
    if green and mask_image is not None:
        raise InputError("give either a mask image or green_mask=True, not both")
    if green:
        return imgs.green_mask(image)
    if mask_image is None:
        raise InputError("inpainting needs a mask image (white = repaint) or green_mask=True")
    return imgs.load_image(mask_image, "mask image")


@dataclass
class _KnownRegion:
    """Inpainting with an ordinary checkpoint: the known region (mask 0) is kept at the image,
    noised to the sigma the latents are at, as diffusers' pipeline does after every scheduler
    step: after each of ours, and before each model evaluation between steps (Heun's predictor,
    PLMS's look-ahead), which diffusers' schedulers take as steps of their own. The mask is 0/1,
    so blending latents that were already blended changes nothing."""

    init: torch.Tensor  # (B, 4, h, w) VP latents of the image
    noise: torch.Tensor  # (B, 4, h, w) the noise x_T was drawn from
    mask: torch.Tensor  # (B, 1, h, w) 0/1, 1 = repaint
    sigmas: torch.Tensor
    blended_at: float | None = field(default=None, init=False)  # sigma of the last post-step blend

    def blend(self, x: torch.Tensor, sigma, last: bool = False) -> torch.Tensor:
        # the image noised to `sigma` (VE scaling); after the last step diffusers blends the
        # clean latents in VP scaling
        known = samplers.to_ve(self.init, sigma) if last else self.init + self.noise * sigma
        m = self.mask.to(x.device)
        return (1 - m) * known.to(x.device) + m * x

    def model(self, model):
        """`model(x, sigma)` that blends first, except at the start (diffusers does not blend x_T)
        and at a step's start (the post-step blend just did)."""
        first = float(self.sigmas[0])

        def blended(x, sigma, *args, **kwargs):
            if float(sigma) not in (first, self.blended_at):
                x = self.blend(x, sigma)
            return model(x, sigma, *args, **kwargs)
        return blended

    def callback(self, callback: Callback | None) -> Callback:
        """The post-step blend, then the user's callback (whose returned latents replace x)."""
        def after_step(step: int, total: int, x: torch.Tensor) -> torch.Tensor:
            x = self.blend(x, self.sigmas[step], last=step == total)
            self.blended_at = float(self.sigmas[step])
            out = callback(step, total, x) if callback is not None else None
            return x if out is None else out
        return after_step
