"""The `sdlite` command: txt2img, img2img, inpaint, convert, info, samplers, demo.

Exit codes: 0 success, 2 usage errors (bad options, sizes, unreadable inputs: InputError),
1 runtime failures (unreadable or unsupported checkpoints, unwritable outdir: SdliteError),
130 interrupted (Ctrl-C). Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from . import metadata as meta
from .errors import CheckpointError, InputError, SdliteError, UnsupportedModelError, is_out_of_memory

PROG = "sdlite"
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
DEVICES = ("auto", "cpu", "cuda", "mps")
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # --channels-last, --cfg-batch
MAX_SEED = 2**32  # random seeds are drawn below this, like A1111
MAX_CLIP_SKIP = 12  # SD v1's text encoder has 12 layers (a smaller model is checked once loaded)

# CompVis script defaults (txt2img: PLMS, 50 steps, 7.5, 512x512; img2img: DDIM, strength 0.75).
DEFAULTS = {
    "txt2img": dict(sampler="plms", steps=50, cfg_scale=7.5, width=512, height=512, strength=None),
    "img2img": dict(sampler="ddim", steps=50, cfg_scale=7.5, width=None, height=None, strength=0.75),
    "inpaint": dict(sampler="ddim", steps=50, cfg_scale=7.5, width=None, height=None, strength=1.0),
}

EXAMPLES = {
    "main": """\
examples:
  sdlite demo                                   # no weights needed: a tiny random model, 3 images
  sdlite txt2img "a red fox in the snow" --model v1-5-pruned-emaonly.safetensors
  sdlite img2img "oil painting" --init-image photo.png --strength 0.6
  sdlite inpaint "a cat" --init-image room.png --mask mask.png
  sdlite convert model.ckpt model-fp16.safetensors --dtype fp16
  sdlite info outputs/00000-42.png
  sdlite samplers

Set SDLITE_MODEL=/path/to/model.safetensors to skip --model.""",
    "txt2img": """\
examples:
  sdlite txt2img "a photograph of an astronaut riding a horse" --model sd-v1-5.safetensors
  sdlite txt2img "a castle" -n "blurry" --sampler "DPM++ 2M" --karras --steps 25 --seed 42
  sdlite txt2img "a castle" --batch-size 4 --width 512 --height 768 --device cuda --dtype fp16
  sdlite txt2img --from-file prompts.txt --steps 30
  sdlite txt2img --params-from outputs/00003-42.png      # the same image again""",
    "img2img": """\
examples:
  sdlite img2img "a watercolor landscape" --init-image photo.png --strength 0.6
  sdlite img2img "the same, at night" --init-image in.png --width 512 --height 512 --seed 7""",
    "inpaint": """\
examples:
  sdlite inpaint "a vase of flowers" --init-image room.png --mask mask.png   # white = repaint
  sdlite inpaint --init-image room.png --green-mask                           # repaint pure green""",
    "convert": """\
examples:
  sdlite convert v1-5-pruned.ckpt v1-5-fp16.safetensors --dtype fp16
  sdlite convert ./my-diffusers-model/ my-model.safetensors
  sdlite convert model-novae.safetensors model.safetensors --vae vae-ft-mse-840000-ema-pruned.safetensors""",
    "info": """\
examples:
  sdlite info v1-5-pruned-emaonly.safetensors
  sdlite info outputs/00000-42.png
  sdlite info outputs/00000-42.png --json""",
    "demo": """\
examples:
  sdlite demo
  sdlite demo --outdir /tmp/sdlite-demo""",
}


# ---------------------------------------------------------------------------------------------
# Console output


class _Stream:
    """sys.stdout or sys.stderr (looked up at each write), whose reader may leave: then what is
    written goes to /dev/null and the run goes on (`sdlite txt2img ... 2>&1 | head -1`: the images
    are the result, and every one is still saved)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):  # fileno, isatty, encoding... of the stream itself
        return getattr(getattr(sys, self.name), attr)

    def write(self, text: str) -> int:
        try:
            return getattr(sys, self.name).write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            getattr(sys, self.name).flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        stream = getattr(sys, self.name)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


STDOUT, STDERR = _Stream("stdout"), _Stream("stderr")


class UI:
    """Where messages go: results to stdout, notes and progress to stderr, errors always."""

    def __init__(self, quiet: bool = False, debug: bool = False):
        self.quiet = quiet
        self.debug = debug

    def out(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=STDOUT, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(msg, file=STDERR)  # above a progress bar that is showing, not inside it
            STDERR.flush()

    def error(self, msg: str) -> None:
        print(f"{PROG}: error: {' '.join(str(msg).split())}", file=STDERR, flush=True)

    def progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=STDERR, disable=self.quiet, leave=False,
                    dynamic_ncols=True)


class _UsageError(Exception):
    """An argparse error, re-raised so that main() prints one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{PROG}: error: {message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# Argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if value < -1 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2^64 - 1 (-1 = random), got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _dtype_name(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose fp32, fp16 or bf16")
    return DTYPES[text.lower()]


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, formatter_class=fmt, epilog=EXAMPLES["main"],
                     description="Stable Diffusion v1.x image generation: faithful, memory-lean, plain PyTorch.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the versions of sdlite, torch and python")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = _Parser(add_help=False)
    _add_common(common, top=False)
    gen = _generation_parent()

    p = sub.add_parser("txt2img", parents=[gen, common], formatter_class=fmt, epilog=EXAMPLES["txt2img"],
                       help="generate images from a text prompt",
                       description="Generate images from a text prompt (defaults: PLMS, 50 steps, CFG 7.5, 512x512).")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the text prompt (or --from-file / --params-from)")
    p.set_defaults(func=cmd_generate, mode="txt2img")

    p = sub.add_parser("img2img", parents=[gen, common], formatter_class=fmt, epilog=EXAMPLES["img2img"],
                       help="repaint an image guided by a prompt",
                       description="Repaint an init image guided by a prompt (defaults: DDIM, 50 steps, strength 0.75; "
                                   "size: the image's own, rounded down to multiples of 8).")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the text prompt (or --from-file / --params-from)")
    p.add_argument("--init-image", "-i", required=True, metavar="FILE", help="the image to start from")
    p.add_argument("--strength", type=_finite_float, metavar="S",
                   help="how much to change the image, in (0, 1] (default 0.75): runs int(steps * S) steps")
    p.set_defaults(func=cmd_generate, mode="img2img")

    p = sub.add_parser("inpaint", parents=[gen, common], formatter_class=fmt, epilog=EXAMPLES["inpaint"],
                       help="repaint the masked part of an image",
                       description="Repaint the masked region of an image (white mask pixels = repaint). "
                                   "Works with inpainting checkpoints (9-channel UNet) and ordinary ones.")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="the text prompt (may be omitted)")
    p.add_argument("--init-image", "-i", required=True, metavar="FILE", help="the image to repaint")
    mask = p.add_mutually_exclusive_group(required=True)
    mask.add_argument("--mask", metavar="FILE", help="mask image: white = repaint, black = keep")
    mask.add_argument("--green-mask", action="store_true", help="repaint the init image's pure green (0,255,0) pixels")
    p.add_argument("--strength", type=_finite_float, metavar="S", help="denoising strength in (0, 1] (default 1.0)")
    p.set_defaults(func=cmd_generate, mode="inpaint")

    p = sub.add_parser("convert", parents=[common], formatter_class=fmt, epilog=EXAMPLES["convert"],
                       help="write any supported checkpoint as a standard single-file .safetensors",
                       description="Convert a CompVis .ckpt/.safetensors file or a diffusers folder to a standard "
                                   "CompVis-layout single-file .safetensors (no EMA copy, no training buffers).")
    p.add_argument("input", metavar="IN", help="checkpoint file or diffusers folder")
    p.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--dtype", type=_dtype_name, metavar="{fp32,fp16,bf16}", help="convert the weights (fp16 halves the file)")
    p.add_argument("--ema", action="store_true", help="export the EMA UNet weights of files that carry both")
    p.add_argument("--int8", action="store_true",
                   help="quantize the UNet and text encoder to per-channel int8 (loads directly; about 1/4 of the fp32 file)")
    p.add_argument("--vae", metavar="PATH", help="bake in this VAE file (.safetensors/.ckpt or diffusers vae/ folder) "
                                                 "in place of IN's own VAE, or where IN has none")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", parents=[common], formatter_class=fmt, epilog=EXAMPLES["info"],
                       help="describe a checkpoint, or show the parameters stored in an image",
                       description="For a checkpoint: architecture, dtype, size, EMA, hash. For an image made by "
                                   "sdlite or the A1111 web UI: the generation parameters.")
    p.add_argument("file", metavar="FILE", help="checkpoint file, diffusers folder, VAE file or PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("samplers", parents=[common], formatter_class=fmt, help="list the samplers",
                       description="The samplers and their A1111 names (accepted by --sampler).")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("demo", parents=[common], formatter_class=fmt, epilog=EXAMPLES["demo"],
                       help="txt2img, img2img and inpaint on a tiny random-weight model (no download)",
                       description="Create (once, cached) a tiny random-weight SD v1 checkpoint and run txt2img, "
                                   "img2img and inpaint on it. Random weights make noise: this checks the "
                                   "installation, not image quality.")
    p.add_argument("--outdir", "-o", default="outputs", metavar="DIR", help="where to write the PNGs (default outputs/)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="compute device (default auto)")
    p.add_argument("--rebuild", action="store_true", help="re-create the cached tiny checkpoint")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    # Sub-command copies use SUPPRESS so they do not reset a value given before the command.
    default = False if top else argparse.SUPPRESS
    parser.add_argument("--quiet", "-q", action="store_true", default=default, help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", default=default, help="show the traceback of errors")


def _generation_parent() -> argparse.ArgumentParser:
    gen = _Parser(add_help=False)
    g = gen.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH",
                   help="SD v1.x checkpoint (.safetensors/.ckpt) or diffusers folder (default: $SDLITE_MODEL)")
    g.add_argument("--vae", metavar="PATH", help="a separate VAE (.safetensors/.ckpt, e.g. vae-ft-mse-840000) "
                                                 "or diffusers vae/ folder; needed by checkpoints without one")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="compute device (default auto: cuda, else mps, else cpu)")
    g.add_argument("--dtype", type=_dtype_name, metavar="{fp32,fp16,bf16}",
                   help="compute dtype (default fp32 on cpu, fp16 on gpu)")
    g.add_argument("--memory", choices=("normal", "low", "high"), default="normal",
                   help="low: keep one model in memory at a time (slower, for small machines); high: keep "
                        "the text encoder and VAE on the GPU too (normal parks them in host memory on CUDA)")
    g.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: per-channel int8 weights for the UNet and text encoder (about 1/4 of fp32)")
    g.add_argument("--attention", choices=("sdpa", "chunked", "plain"), default="sdpa",
                   help="attention kernel: sdpa (default), chunked (bounded memory), plain (reference)")
    g.add_argument("--attention-chunk", type=_positive_int, metavar="N",
                   help="block size of chunked attention (query rows and key columns; default 1024)")
    g.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                   help="decode/encode the VAE in overlapping tiles: auto = above 768x768 in area or on out-of-memory "
                        "(below that, large decodes run in exact row bands); off = plain one-call decode")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="UNet convolutions in NHWC layout (CUDA only): auto = on for float weights on CUDA")
    g.add_argument("--cfg-batch", choices=("auto", "on", "off"), default="auto",
                   help="the two halves of classifier-free guidance as one UNet call (on) or two (off: half the "
                        "activations); auto = one, except with --memory low on the CPU/MPS, or on CUDA above one "
                        "512x512 image (width x height x batch size)")
    g.add_argument("--fast", action="store_true",
                   help="fast mode (not exact): torch.compile on CUDA (a one-time warm-up; within 40 dB PSNR of exact); "
                        "int8 x int8 UNet products on a CPU with VNNI (SD v1.5: 36.5 dB PSNR from exact; tiny models less)")
    g = gen.add_argument_group("generation")
    g.add_argument("--negative-prompt", "-n", metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", "-s", type=_positive_int, metavar="N", help="sampling steps (default 50)")
    g.add_argument("--cfg-scale", "-c", type=_finite_float, metavar="X", help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--sampler", metavar="NAME",
                   help="plms, ddim, euler, euler_a, heun, dpmpp_2m or an A1111 name such as 'DPM++ 2M Karras' "
                        "(default plms for txt2img, ddim otherwise; see 'sdlite samplers')")
    g.add_argument("--karras", action="store_true", default=None, help="Karras noise schedule (euler, euler_a, heun, dpmpp_2m)")
    g.add_argument("--seed", type=_seed, metavar="N", help="random seed (default: random, always printed); image i gets seed + i")
    g.add_argument("--width", "-W", type=_positive_int, metavar="PX", help="image width, a multiple of 8")
    g.add_argument("--height", "-H", type=_positive_int, metavar="PX", help="image height, a multiple of 8")
    g.add_argument("--batch-size", "-b", type=_positive_int, default=1, metavar="N", help="images per prompt (default 1)")
    g.add_argument("--clip-skip", type=_positive_int, metavar="N", help="use the CLIP layer N from the end (default 1 = last)")
    g = gen.add_argument_group("input and output")
    g.add_argument("--from-file", metavar="FILE", help="a text file with one prompt a line (blank lines skipped)")
    g.add_argument("--params-from", metavar="PNG", help="take prompt and settings from an image made by sdlite or "
                                                        "A1111; options given on the command line win")
    g.add_argument("--outdir", "-o", default="outputs", metavar="DIR", help="output folder (default outputs/)")
    return gen


class _Version(argparse.Action):
    """--version, with torch's version looked up only when asked (the command starts without torch)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_string(), file=STDOUT, flush=True)
        parser.exit()


def _version_string() -> str:
    import platform

    import torch

    return f"{PROG} {__version__} (torch {torch.__version__}, python {platform.python_version()})"


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the `sdlite` command with `argv` (default sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            command = getattr(args, "command", None)
            hint = ""
            if command in DEFAULTS and not extra[0].startswith("-"):  # a generation command's words
                hint = f'; a prompt of several words needs quotes: {PROG} {command} "a red house"'
            raise _UsageError(f"{PROG}: error: unrecognized arguments: {' '.join(extra)}{hint} "
                              f"(see '{PROG}{' ' + command if command else ''} --help')")
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    ui = UI(quiet=getattr(args, "quiet", False), debug=getattr(args, "debug", False))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    with warnings.catch_warnings():
        _route_warnings(ui)
        return _run(args, ui)


def _run(args, ui: UI) -> int:
    try:
        return args.func(args, ui) or 0
    except KeyboardInterrupt:
        _traceback(ui)
        ui.error("interrupted")
        return 130
    except BrokenPipeError:  # `sdlite info X | head`: the reader left; nothing more to say
        STDOUT._drop()
        return 0
    except InputError as e:
        _traceback(ui)
        ui.error(e)
        return 2
    except SdliteError as e:
        _traceback(ui)
        ui.error(e)
        return 1
    except Exception as e:  # a bug or an environment failure (out of memory, ...): still one line
        _traceback(ui)
        if is_out_of_memory(e):
            detail = " ".join(str(e).split())[:160]
            ui.error(f"out of memory{f' ({detail})' if detail else ''}; try a smaller size or batch, --memory low, "
                     "--quantize int8 or --vae-tiling on")
            return 1
        hint = "" if ui.debug else " (run with --debug for the traceback)"
        ui.error(f"{e.__class__.__name__}: {e}{hint}")
        return 1



def _traceback(ui: UI) -> None:
    if ui.debug:
        traceback.print_exc(file=sys.stderr)


def _route_warnings(ui: UI) -> None:
    if ui.quiet:
        warnings.simplefilter("ignore")
        return
    warnings.simplefilter("default")
    # each truncated prompt is worth a warning, also the same text again (a batch file's lines)
    warnings.filterwarnings("always", message=r"(negative )?prompt (truncated|has web-UI syntax)")

    def show(message, category, filename, lineno, file=None, line=None):
        ui.note(f"warning: {message}")

    warnings.showwarning = show


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Run:
    """One generation command after option resolution: what to make and where."""

    mode: str
    prompts: list[str]
    negative_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    karras: bool
    seed: int
    random_seed: bool
    width: int | None
    height: int | None
    batch_size: int = 1
    clip_skip: int = 1
    strength: float | None = None
    init_image: object = None  # PIL image
    mask_image: object = None  # PIL image
    green_mask: bool = False
    outdir: Path = Path("outputs")
    expected_hash: str | None = None  # model hash written in --params-from's image
    expected_vae: str | None = None  # VAE name and hash written there (a separate VAE)
    expected_vae_hash: str | None = None
    expected_options: str | None = None  # "sdlite options" of an image made by sdlite ("" = defaults)


@dataclass
class Model:
    """A loaded pipeline and the names/hashes written into the metadata."""

    sd: object  # pipeline.StableDiffusion
    hash: str | None
    name: str
    vae_hash: str | None = None
    vae_name: str | None = None
    label: str = field(default="")


def cmd_generate(args, ui: UI) -> int:
    run = resolve_run(args)
    model_path = resolve_model_path(args.model)
    resolve_device(args.device)
    run.outdir = meta.check_outdir(run.outdir)
    model = load_model(args.model, args.vae, args.device, args.dtype, ui, memory=args.memory,
                       quantize=args.quantize, attention=args.attention, attention_chunk=args.attention_chunk,
                       vae_tiling=args.vae_tiling, fast=args.fast,
                       channels_last=AUTO_ON_OFF[args.channels_last], cfg_batch=AUTO_ON_OFF[args.cfg_batch])
    if model.sd.is_inpainting_model and run.mode != "inpaint":
        raise InputError(f"{model.name} is an inpainting checkpoint (9-channel UNet): use 'sdlite inpaint'")
    if run.expected_hash and model.hash and not meta.same_model_hash(run.expected_hash, model.hash, model_path):
        ui.note(f"note: {args.params_from} was made with model hash {run.expected_hash}, this model is "
                f"{model.hash}: the image will differ")
    if run.expected_vae and not args.vae:
        ui.note(f"note: {args.params_from} was made with VAE {run.expected_vae}; pass it with --vae to match")
    elif args.params_from and args.vae and not (run.expected_vae or run.expected_vae_hash):
        ui.note(f"note: {args.params_from} was made without a separate VAE, this run uses {model.vae_name}: "
                "the image may differ")
    elif run.expected_vae_hash and model.vae_hash and run.expected_vae_hash != model.vae_hash:
        ui.note(f"note: {args.params_from} was made with VAE hash {run.expected_vae_hash}, this VAE is "
                f"{model.vae_hash}: the image will differ")
    now = meta.run_options_label(model.sd.run_options())
    if run.expected_options is not None and run.expected_options != now:
        ui.note(f"note: {args.params_from} was made with options '{run.expected_options or 'float32, exact'}', "
                f"this run has '{now or 'float32, exact'}' (see --dtype, --quantize, --fast, --ema): "
                "the image will differ")
    generate(model, run, ui)
    return 0


def resolve_run(args) -> Run:
    """Defaults, then --params-from, then explicit options; validated before any model loads."""
    mode = args.mode
    defaults = dict(DEFAULTS[mode], negative_prompt="", karras=False, clip_skip=1, seed=None)
    opts = dict(defaults)
    params = {}
    if args.params_from:
        text = meta.read_parameters(args.params_from)
        if text is None:
            raise InputError(f"{args.params_from}: no generation parameters in this image")
        info = meta.parse_parameters(text)
        params = meta.options_from_parameters(info, args.params_from, sampler=args.sampler is None)
        if mode == "txt2img":
            params.pop("strength", None)
        opts.update({k: v for k, v in params.items() if k != "prompt"})
        opts["expected_hash"] = info.get("Model hash")
        opts["expected_vae"], opts["expected_vae_hash"] = info.get("VAE"), info.get("VAE hash")
        if info.get("Version", "").startswith(meta.VERSION_TAG):  # only sdlite writes the options field
            opts["expected_options"] = info.get(meta.OPTIONS_KEY, "")
    # settings given on the command line win over the image's
    given = {name for name in ("negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "clip_skip",
                               "strength") if getattr(args, name, None) is not None}
    opts.update({name: getattr(args, name) for name in given})
    if args.sampler is not None:
        opts["sampler"], opts["karras"] = meta.resolve_sampler(args.sampler)
        given |= {"sampler", "karras"}
    if args.karras:
        opts["karras"] = True
        given.add("karras")
    prompts = _prompts(args, params)
    random_seed = opts["seed"] is None or opts["seed"] == -1
    seed = random.randrange(MAX_SEED) if random_seed else opts["seed"]
    run = Run(mode=mode, prompts=prompts, negative_prompt=opts["negative_prompt"], steps=opts["steps"],
              cfg_scale=opts["cfg_scale"], sampler=opts["sampler"], karras=opts["karras"], seed=seed,
              random_seed=random_seed, width=opts["width"], height=opts["height"], batch_size=args.batch_size,
              clip_skip=opts["clip_skip"], strength=opts["strength"], outdir=Path(args.outdir),
              expected_hash=opts.get("expected_hash"), expected_vae=opts.get("expected_vae"),
              expected_vae_hash=opts.get("expected_vae_hash"), expected_options=opts.get("expected_options"))
    try:
        _validate(run)
    except InputError as e:
        # from the image if the run with the defaults in place of the image's values passes
        from_image = {k: 0 if k == "seed" else defaults[k] for k in params if k in defaults and k not in given}
        if from_image and _passes(dataclasses.replace(run, **from_image)):
            raise InputError(f"{e} (from --params-from {args.params_from})") from None
        raise
    _load_images(run, args)
    return run


def _passes(run: Run) -> bool:
    try:
        _validate(run)
        return True
    except InputError:
        return False


def _prompts(args, params: dict) -> list[str]:
    if args.from_file and args.prompt is not None:
        raise InputError("give a PROMPT or --from-file, not both")
    if args.from_file:
        path = Path(args.from_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"--from-file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--from-file {path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
        prompts = [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise InputError(f"--from-file {path}: the file has no prompts (one prompt a line)")
        return prompts
    if args.prompt is not None:
        return [args.prompt]
    if "prompt" in params:
        return [params["prompt"]]
    if args.mode == "inpaint":
        return [""]
    raise InputError(f"no prompt: give PROMPT, --from-file FILE or --params-from IMAGE (see 'sdlite {args.mode} --help')")


def _validate(run: Run) -> None:
    from . import samplers

    for name in ("width", "height"):
        v = getattr(run, name)
        if v is not None and (v < 8 or v % 8):
            raise InputError(f"{name} {v} is not a multiple of 8 (try {max(8, v - v % 8)} or {v + 8 - v % 8})")
    if run.steps < 1:
        raise InputError(f"steps must be at least 1, got {run.steps}")
    samplers.get_sigmas(run.sampler, run.steps, run.karras)  # sampler / Karras combination
    if run.strength is not None:
        if not 0 < run.strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {run.strength}")
        if int(run.steps * run.strength) < 1:
            raise InputError(f"strength {run.strength} with {run.steps} step{'s' if run.steps != 1 else ''} runs no step; "
                             "raise --steps or --strength")
    if not 1 <= run.clip_skip <= MAX_CLIP_SKIP:
        raise InputError(f"clip skip must be from 1 to {MAX_CLIP_SKIP}, got {run.clip_skip}")
    if not math.isfinite(run.cfg_scale):
        raise InputError(f"CFG scale must be a finite number, got {run.cfg_scale}")
    if not run.random_seed and not 0 <= run.seed <= 2**64 - run.batch_size:
        raise InputError(f"seed must be from 0 to 2^64 - {run.batch_size} for {run.batch_size} image(s), got {run.seed}")


def _load_images(run: Run, args) -> None:
    from . import images

    if run.mode == "txt2img":
        return
    run.init_image = images.load_image(args.init_image, "init image")
    if run.width is None or run.height is None:
        images.default_size(run.init_image)  # too small: fails now, not after loading the model
    if run.mode == "inpaint":
        run.green_mask = bool(args.green_mask)
        run.mask_image = None if args.green_mask else images.load_image(args.mask, "mask image")
        if run.green_mask:
            images.green_mask(run.init_image)  # fails now, not after loading the model


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    from .pipeline import check_device

    return check_device(name)  # CUDA / MPS present, as the Python API checks it


def resolve_model_path(arg: str | None) -> Path:
    source = "--model" if arg else "SDLITE_MODEL"
    value = arg or os.environ.get("SDLITE_MODEL")
    if not value:
        raise InputError("no model given: pass --model FILE (an SD v1.x .safetensors/.ckpt file or a diffusers "
                         "folder) or set SDLITE_MODEL=FILE; 'sdlite demo' runs without one")
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"model {path} (from {source}): no such file or directory")
    return path


def load_model(model_arg: str | None, vae_arg: str | None, device_name: str, dtype_name: str | None,
               ui: UI, memory: str = "normal", **options) -> Model:
    """Open the checkpoint (and the separate VAE) on the chosen device, dtype and memory mode."""
    import torch

    from .pipeline import StableDiffusion
    from .vaefile import vae_name

    path = resolve_model_path(model_arg)
    if vae_arg and not Path(vae_arg).expanduser().exists():
        raise InputError(f"--vae {vae_arg}: no such file or directory")
    device = resolve_device(device_name)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    start = time.perf_counter()
    vae_path = Path(vae_arg).expanduser() if vae_arg else None
    sd = StableDiffusion(path, device=device, dtype=dtype, memory=memory, vae=vae_path, **options)
    model = Model(sd, meta.model_hash(path), meta.model_name(path))
    if vae_path:
        model.vae_hash, model.vae_name = meta.model_hash(vae_path), vae_name(vae_path)
    dtype_label = str(sd.dtype).removeprefix("torch.")
    options = sd.run_options()
    model.label = (f"{model.name} ({sd.config.name}) on {device.type}, {dtype_label}"
                   + (", int8 weights" if options["quantize"] == "int8" else "") + (", fast mode" if options["fast"] else ""))
    ui.note(f"loaded {model.label}{' with VAE ' + model.vae_name if model.vae_name else ''} "
            f"in {time.perf_counter() - start:.1f} s")
    return model


def _size_label(run: Run) -> str:
    if run.width and run.height:
        return f", {run.width}x{run.height}"
    if run.width or run.height:
        given = f"width {run.width}" if run.width else f"height {run.height}"
        return f", {given} (the other side from the init image)"
    return ""


def generate(model: Model, run: Run, ui: UI) -> list[Path]:
    """Run every prompt of `run` (batch_size images each, seeds seed..seed+batch-1) and save PNGs."""
    seeds = f"{run.seed}" if run.batch_size == 1 else f"{run.seed}..{run.seed + run.batch_size - 1}"
    ui.note(f"{run.mode}: {run.sampler}{' karras' if run.karras else ''}, {run.steps} step{'s' if run.steps != 1 else ''}, CFG {run.cfg_scale:g}, "
            f"seed {seeds}{' (random)' if run.random_seed else ''}"
            + _size_label(run)
            + (f", strength {run.strength:g}" if run.strength is not None else ""))
    if model.sd.compiles_unet:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's temp folder")
        ui.note("fast mode: the first step at each image size compiles the UNet (about a minute the first "
                f"time; the compiled kernels are kept in {cache}, so later runs start sooner)")
    paths = []
    for n, prompt in enumerate(run.prompts):
        label = f"prompt {n + 1}/{len(run.prompts)}" if len(run.prompts) > 1 else run.mode
        start = time.perf_counter()
        result = _call_pipeline(model.sd, run, prompt, ui, label)
        elapsed = time.perf_counter() - start
        for image, params in zip(result.images, result.params):
            text = meta.format_parameters(params, model_hash=model.hash, model_name=model.name,
                                          vae_hash=model.vae_hash, vae_name=model.vae_name, version=__version__)
            # numbered when saved: another run writing to the same folder meanwhile is counted
            path = meta.save_png(image, run.outdir, params["seed"], text)
            paths.append(path)
            ui.out(f"{path}  seed {params['seed']}  ({elapsed / len(result.images):.1f} s/image)")
    return paths


def _call_pipeline(sd, run: Run, prompt: str, ui: UI, label: str):
    total = run.steps if run.strength is None else min(int(run.steps * run.strength), run.steps)
    desc = f"{label} ({run.batch_size} images)" if run.batch_size > 1 else label
    with ui.progress(total, desc) as bar:
        def callback(step, total_steps, latents):
            if bar.total != total_steps:
                bar.total = total_steps
            bar.update(step - bar.n)

        common = dict(negative_prompt=run.negative_prompt, steps=run.steps, guidance_scale=run.cfg_scale,
                      sampler=run.sampler, karras=run.karras, seed=run.seed, batch_size=run.batch_size,
                      clip_skip=run.clip_skip, width=run.width, height=run.height, callback=callback)
        if run.mode == "txt2img":
            return sd.txt2img(prompt, **common)
        if run.mode == "img2img":
            return sd.img2img(prompt, run.init_image, strength=run.strength, **common)
        return sd.inpaint(prompt, run.init_image, run.mask_image, green_mask=run.green_mask,
                          strength=run.strength, **common)


# ---------------------------------------------------------------------------------------------
# convert, info, samplers, demo


def cmd_convert(args, ui: UI) -> int:
    import torch

    from .checkpoint import export_checkpoint, open_checkpoint
    from .vaefile import vae_name

    src, dst = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    vae = Path(args.vae).expanduser() if args.vae else None
    if vae and not vae.exists():
        raise InputError(f"--vae {args.vae}: no such file or directory")
    if dst.suffix.lower() != ".safetensors":
        raise InputError(f"{dst}: the output must be a .safetensors file")
    if dst.exists() and src.resolve() == dst.resolve():
        raise InputError(f"{dst}: the output would overwrite the input")
    if dst.exists() and not args.force:
        raise InputError(f"{dst} exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: output folder does not exist")
    if dst.is_dir():
        raise InputError(f"{dst}: is a folder; give the output file's name")
    if not os.access(dst.parent, os.W_OK):
        raise InputError(f"{dst.parent}: cannot write in this folder (permission denied)")
    start = time.perf_counter()
    with _terminate_as_interrupt():  # `kill`, `timeout`, systemd: the partial file is removed too
        export_checkpoint(src, dst, dtype=getattr(torch, args.dtype) if args.dtype else None, ema=args.ema,
                          int8=args.int8, vae=vae)
    ckpt = open_checkpoint(dst)  # prove the result loads
    kind = _dtype(ckpt.dtype) + (" + int8 per-channel" if ckpt.quantization else "") \
        + (f", VAE {vae_name(vae)} baked in" if vae else "" if ckpt.has_vae else ", no VAE")
    ui.out(f"wrote {dst}: {ckpt.config.name}, {kind}, {_size(dst.stat().st_size)}, "
           f"model hash {meta.model_hash(dst)} ({time.perf_counter() - start:.1f} s)")
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt meanwhile (main thread only), so cleanup code runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_info(args, ui: UI) -> int:
    import json

    from .checkpoint import SINGLE_FILE_SUFFIXES

    path = Path(args.file).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir() or path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        info = checkpoint_info(path)
    else:
        text = meta.read_parameters(path)
        if text is None:
            raise InputError(f"{path}: no generation parameters in this image (not made by sdlite or A1111?)")
        if args.json:
            print(json.dumps({"file": str(path), "parameters": text, **meta.parse_parameters(text)}, indent=2))
        else:
            print(text)
        return 0
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0


def checkpoint_info(path: Path) -> dict:
    """What a checkpoint (or a standalone VAE) is: kind, architecture, dtype, size, EMA, hashes."""
    import torch

    from .checkpoint import open_checkpoint
    from .quantize import _is_scale
    from .vaefile import read_vae_tensors

    try:
        ckpt = open_checkpoint(path)
    except (UnsupportedModelError, CheckpointError) as error:  # a standalone VAE (file or diffusers vae/)?
        if (path / "unet").is_dir():  # a broken diffusers model folder, not a VAE
            raise
        try:
            tensors = read_vae_tensors(path)
        except CheckpointError:
            raise error from None
        return _vae_info(path, tensors)
    states = {c: ckpt.state_dict(c) for c in ("unet", "vae", "text")}
    counts = {c: sum(t.numel() for k, t in state.items() if not _is_scale(k, state)) for c, state in states.items()}
    int8_parts = [name for c, name in (("unet", "UNet"), ("text", "text encoder"), ("vae", "VAE"))
                  if any(t.dtype == torch.int8 for t in states[c].values())]
    kinds = {"sd-v1": "SD v1.x", "sd-v1-inpainting": "SD v1.x inpainting (9-channel UNet)",
             "tiny": "tiny test model (SD v1 layout)", "tiny-inpainting": "tiny test model (SD v1 inpainting layout)",
             "sd-v1-custom": "SD v1.x layout, non-standard sizes"}
    info = {
        "file": str(path),
        "format": {"safetensors": "single file, safetensors", "ckpt": "single file, pickle (.ckpt)",
                   "diffusers": "diffusers folder"}[ckpt.format],
        "architecture": f"{ckpt.config.name}: {kinds.get(ckpt.config.name, ckpt.config.name)}",
        "parameters": f"UNet {_count(counts['unet'])}, "
                      + (f"VAE {_count(counts['vae'])}" if ckpt.has_vae else "no VAE (give one with --vae)")
                      + f", text encoder {_count(counts['text'])}",
        "dtype": _dtype(ckpt.dtype) + (f" ({' and '.join(int8_parts)} int8 per-channel, sdlite format 1)"
                                       if ckpt.quantization == "int8" else ""),
        "size": _size(ckpt.size_bytes) + (f" (file {_size(path.stat().st_size)})" if path.is_file() else ""),
        "ema_weights": "yes" if ckpt.has_ema else "no",
        "vae_weights": "yes" if ckpt.has_vae else "no (give a VAE file with --vae)",
    }
    if path.is_file():
        digest = meta.sha256_file(path)
        info["sha256"] = digest
        info["model_hash"] = f"{digest[:10]} (A1111 / civitai AutoV2)"
    return info


def _vae_info(path: Path, tensors: dict) -> dict:
    import torch

    floats = [t for t in tensors.values() if t.is_floating_point()]
    info = {"file": str(path), "format": "standalone VAE", "architecture": "AutoencoderKL (SD v1 VAE)",
            "parameters": _count(sum(t.numel() for t in tensors.values())),
            "dtype": _dtype(floats[0].dtype if floats else torch.float32),
            "size": _size(sum(t.numel() * t.element_size() for t in tensors.values()))}
    if path.is_file():
        digest = meta.sha256_file(path)
        info["sha256"] = digest
        info["model_hash"] = f"{digest[:10]} (A1111 VAE hash)"
    return info


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def cmd_samplers(args, ui: UI) -> int:
    from . import samplers

    rows = [("name", "A1111 name", "Karras", "method")]
    for name, fn in samplers.SAMPLERS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        default = {"plms": " [txt2img default]", "ddim": " [img2img/inpaint default]"}.get(name, "")
        rows.append((name, samplers.SAMPLER_LABELS[name], "no" if name in samplers.DISCRETE else "yes", doc + default))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    print("\n--sampler takes the name or the A1111 name (any case); add --karras, or ' Karras' to the name.")
    return 0


def cmd_demo(args, ui: UI) -> int:
    from . import demo

    return demo.run(args, ui)
