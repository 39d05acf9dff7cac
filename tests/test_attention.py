"""Attention modes: every mode equals the textbook formula, on raw tensors and inside the tiny
models, and the chunked mode really bounds the size of what it allocates."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import LargestOutput
from sdlite import attention as attn
from sdlite.attention import (
    MODES, attention, attention_mode, check_attention, chunked_attention, get_attention, plain_attention,
    set_attention,
)
from sdlite.checkpoint import open_checkpoint
from sdlite.errors import InputError
from sdlite.tokenizer import get_tokenizer


@pytest.fixture(autouse=True)
def _restore_setting():
    """No test may leak its attention setting into the rest of the suite."""
    before = get_attention()
    yield
    set_attention(before.mode, before.chunk)


def qkv(b, h, tq, tk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for t in (tq, tk, tk)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# (B, heads, Tq, Tk, d, causal, chunk): UNet self/cross attention, CLIP's causal 77 tokens, the
# VAE's single head, chunks that divide T, do not divide it, are 1, or exceed it.
SHAPES = [
    (2, 8, 256, 256, 40, False, 64),  # UNet self-attention (16x16 latents), chunk divides T
    (2, 8, 256, 256, 40, False, 100),  # chunk does not divide T
    (2, 8, 256, 77, 40, False, 64),  # UNet cross-attention (Tk = 77 text tokens), one key block
    (2, 8, 60, 77, 40, False, 7),  # cross-attention streamed over 11 key blocks
    (2, 12, 77, 77, 64, True, 7),  # CLIP causal self-attention
    (2, 12, 77, 77, 64, True, 1000),  # causal in one block
    (1, 2, 77, 77, 64, True, 1),  # one row and one column per block
    (1, 3, 50, 130, 16, True, 16),  # causal with Tk > Tq (top-left aligned, as SDPA)
    (1, 1, 1024, 1024, 512, False, 1000),  # the VAE's single head at 32x32 latents
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-causal{int(s[5])}-c{s[6]}")
@pytest.mark.parametrize("mode", MODES)
def test_mode_equals_plain_fp32(mode, shape):
    b, h, tq, tk, d, causal, chunk = shape
    q, k, v = qkv(b, h, tq, tk, d)
    expect = plain_attention(q, k, v, causal)
    with attention_mode(mode, chunk):
        out = attention(q, k, v, causal)
    diff = max_diff(out, expect)
    assert out.shape == expect.shape and out.dtype == torch.float32
    if diff > 1e-5:  # say which side is off (both are ~5e-7 from float64 here) and whether it repeats
        truth = plain_attention(q.double(), k.double(), v.double(), causal)
        with attention_mode(mode, chunk):
            again = max_diff(attention(q, k, v, causal), plain_attention(q, k, v, causal))
        pytest.fail(f"{mode} {shape}: max abs diff {diff:.3e} > 1e-5; vs float64: {mode} {max_diff(out, truth):.3e}, "
                    f"plain {max_diff(expect, truth):.3e}; computed again: {again:.3e}")
    print(f"[diff] {mode} {shape}: {diff:.2e}")


def test_chunked_at_sd_scale_64x64_latents():
    """The UNet's first-level self-attention at 512 px (T = 4096), streamed in 1024-blocks."""
    q, k, v = qkv(1, 2, 4096, 4096, 40, seed=3)
    diff = max_diff(chunked_attention(q, k, v, chunk=1024), plain_attention(q, k, v))
    assert diff <= 1e-5, f"max abs diff {diff:.3e}"
    print(f"[diff] chunked T=4096 chunk=1024: {diff:.2e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[7]], ids=str)
def test_half_inputs_against_fp32_reference(dtype, shape):
    """Half-precision inputs: output keeps the dtype; error is a few units of its rounding step,
    like the plain formula run in that dtype (whose error is printed for scale)."""
    b, h, tq, tk, d, causal, chunk = shape
    q, k, v = qkv(b, h, tq, tk, d, seed=1)
    expect = plain_attention(q, k, v, causal)
    half = [t.to(dtype) for t in (q, k, v)]
    out = chunked_attention(*half, causal, chunk)
    assert out.dtype == dtype
    diff, plain_diff = max_diff(out, expect), max_diff(plain_attention(*half, causal), expect)
    eps = torch.finfo(dtype).eps  # 2^-7 for bf16, 2^-10 for fp16
    tol = 8 * eps * max(1.0, expect.abs().max().item())
    assert diff <= tol, f"{dtype} {shape}: max abs diff {diff:.3e} > {tol:.3e} (plain in {dtype}: {plain_diff:.3e})"
    print(f"[diff] chunked {dtype} {shape}: {diff:.2e} (plain in {dtype}: {plain_diff:.2e}, tol {tol:.1e})")


def test_half_precision_statistics_do_not_overflow():
    """Large logits (|s| ~ 300) overflow exp() in fp16 unless the max is tracked in float32
    and subtracted first; the result must stay finite and match the fp32 reference."""
    q, k, v = qkv(1, 2, 200, 200, 16, seed=5)
    q = q * 20
    expect = plain_attention(q, k, v)
    out = chunked_attention(q.half(), k.half(), v.half(), chunk=32)
    assert torch.isfinite(out).all()
    assert max_diff(out, expect) <= 0.05, f"max abs diff {max_diff(out, expect):.3e}"


def test_autograd_flows_through_chunked():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 40, 40, 8, seed=6))
    chunked_attention(q, k, v, causal=True, chunk=16).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    plain_attention(q, k, v, causal=True).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        assert max_diff(got, t.grad) <= 1e-5


# ---------------------------------------------------------------------------- the switch


def test_setting_api_and_restore():
    assert get_attention().mode == "sdpa" and get_attention().chunk == attn.DEFAULT_CHUNK
    previous = set_attention("chunked", chunk=512)
    assert previous.mode == "sdpa"
    assert (get_attention().mode, get_attention().chunk) == ("chunked", 512)
    with attention_mode("plain") as inside:
        assert inside is get_attention() and inside.mode == "plain"
        with attention_mode("chunked", 3):
            assert get_attention().chunk == 3
        assert get_attention().mode == "plain"
    assert (get_attention().mode, get_attention().chunk) == ("chunked", 512)
    with pytest.raises(RuntimeError):
        with attention_mode("sdpa"):
            raise RuntimeError("boom")
    assert get_attention().mode == "chunked", "the previous setting comes back after an exception"


@pytest.mark.parametrize("mode, chunk", [("flash", None), ("", None), ("chunked", 0), ("chunked", -4),
                                         ("chunked", 2.5), ("chunked", True), ("sdpa", "64")])
def test_bad_setting_is_input_error(mode, chunk):
    before = get_attention()
    with pytest.raises(InputError) as err:
        set_attention(mode, chunk)
    message = str(err.value)
    assert "\n" not in message and "sdpa, chunked, plain" in message, message
    with pytest.raises(InputError):
        with attention_mode(mode, chunk):
            pass
    with pytest.raises(InputError):
        check_attention(mode, chunk)
    assert get_attention() == before


def test_check_attention_validates_without_installing():
    assert check_attention("chunked", 64) == attn.AttentionSetting("chunked", 64)
    assert check_attention("plain").chunk == attn.DEFAULT_CHUNK
    assert get_attention().mode == "sdpa"


def test_attention_dispatches_on_the_current_mode(monkeypatch):
    """`attention` reads the setting at call time (models import the function, not the mode)."""
    calls = []
    monkeypatch.setattr(attn, "chunked_attention", lambda *a: calls.append("chunked") or plain_attention(*a[:4]))
    monkeypatch.setattr(attn, "plain_attention", lambda *a: calls.append("plain") or chunked_attention(*a, chunk=8))
    q, k, v = qkv(1, 1, 10, 10, 4)
    for mode in MODES:
        with attention_mode(mode):
            attention(q, k, v)
    assert calls == ["chunked", "plain"]


# ---------------------------------------------------------------------------- in the models


@pytest.fixture(scope="module")
def tiny_models(tiny):
    ck = open_checkpoint(tiny.folder)
    return ck.load("unet"), ck.load("text"), ck.load("vae")


def _spy(monkeypatch) -> list:
    calls = []
    real = attn.chunked_attention

    def spy(q, k, v, causal=False, chunk=attn.DEFAULT_CHUNK):
        calls.append((tuple(q.shape), tuple(k.shape), causal, chunk))
        return real(q, k, v, causal, chunk)

    monkeypatch.setattr(attn, "chunked_attention", spy)
    return calls


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return max_diff(out, ref) / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("chunk", [50, 64, 1000])
def test_tiny_models_same_output_in_every_mode(tiny_models, monkeypatch, chunk):
    unet, text, vae = tiny_models
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, unet.cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    ids = get_tokenizer()(["a photograph of an astronaut riding a horse", ""])
    z = torch.randn(1, vae.cfg.embed_dim, 16, 16, generator=g)
    runs = {"unet": lambda: unet(x, t, ctx), "clip": lambda: text(ids), "vae": lambda: vae.decode(z)}
    calls = _spy(monkeypatch)
    with torch.no_grad(), attention_mode("plain"):
        expect = {name: run() for name, run in runs.items()}
    for mode in ("sdpa", "chunked"):
        with torch.no_grad(), attention_mode(mode, chunk):
            for name, run in runs.items():
                rel = _rel(run(), expect[name])
                assert rel <= 1e-5, f"{name} in {mode} (chunk {chunk}): max rel diff {rel:.3e} > 1e-5"
                print(f"[diff] {name} {mode} chunk={chunk}: rel {rel:.2e}")
    assert any(c[2] for c in calls), "CLIP's causal attention went through the chunked kernel"
    assert any(c[1][2] == 77 and not c[2] for c in calls), "UNet cross-attention went through it"
    assert any(c[0][2] == 256 and c[1][2] == 256 for c in calls), "UNet/VAE self-attention went through it"
    assert all(c[3] == chunk for c in calls)


# ---------------------------------------------------------------------------- memory




@pytest.mark.parametrize("causal", [False, True])
def test_chunked_never_allocates_the_score_matrix(causal):
    """No op of the chunked mode returns more than one (B*heads, chunk, chunk) block (or a
    q-sized tensor); the plain mode, measured the same way, does return all Tq*Tk scores."""
    b, h, t, d, chunk = 2, 4, 2048, 16, 256
    q, k, v = qkv(b, h, t, t, d, seed=2)
    with LargestOutput() as seen:
        out = chunked_attention(q, k, v, causal, chunk)
    bound = max(b * h * chunk * chunk, q.numel())
    assert seen.largest <= bound, f"chunked made a tensor of {seen.largest} elements (> bound {bound})"
    with LargestOutput() as control:
        expect = plain_attention(q, k, v, causal)
    assert control.largest >= b * h * t * t, "the probe must see the full score matrix of the plain mode"
    assert max_diff(out, expect) <= 1e-5
    print(f"[mem] largest tensor: chunked {seen.largest} elements, plain {control.largest} (T*T*B*h = {b*h*t*t})")


def test_chunked_bounds_models_allocations(tiny_models):
    """Inside the tiny UNet at 32x32 latents (T = 1024 self-attention tokens, 8 heads), chunked
    attention keeps every tensor far below one full score matrix; plain makes one."""
    unet, _, _ = tiny_models
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, unet.cfg.in_channels, 32, 32, generator=g)
    ctx = torch.randn(1, 77, unet.cfg.context_dim, generator=g)
    scores = 1 * unet.cfg.num_heads * 1024 * 1024
    with torch.no_grad(), attention_mode("chunked", 128), LargestOutput() as seen:
        unet(x, torch.tensor([500.0]), ctx)
    assert seen.largest < scores / 16, f"largest tensor {seen.largest} elements vs scores {scores}"
    with torch.no_grad(), attention_mode("plain"), LargestOutput() as control:
        unet(x, torch.tensor([500.0]), ctx)
    assert control.largest >= scores


_PEAK = r"""
import sys, torch
from sdlite.attention import attention_mode, attention

def hwm():  # peak resident memory of this process so far, in MiB
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

torch.set_num_threads(2)
# glibc's dynamic mmap threshold otherwise keeps freed 8 MiB score blocks in heap arenas now and
# then (19-48 MiB usually, 70 MiB once in a full test run); fixed thresholds, as low mode sets them
from sdlite.pipeline import _malloc_for_low_memory
_malloc_for_low_memory()
mode = sys.argv[1]
q, k, v = (torch.randn(2, 1, 8192, 64) for _ in range(3))
with torch.no_grad(), attention_mode(mode, 1024):
    attention(q[..., :64, :], k[..., :64, :], v[..., :64, :])  # warm up the kernels
    before = hwm()
    attention(q, k, v)
print(hwm() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_chunked_peak_resident_memory():
    """Real process memory: attention over 8192 tokens (B*heads = 2) needs 512 MiB of fp32 scores
    in the plain formula; chunked (1024-blocks, 8 MiB each) must stay under 64 MiB of extra peak."""
    def peak(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(_PEAK), mode], capture_output=True, text=True,
                             timeout=120, check=True)
        return float(run.stdout.strip().splitlines()[-1])

    chunked, plain = peak("chunked"), peak("plain")
    print(f"[mem] extra peak RSS, T=8192 B*h=2: chunked {chunked:.0f} MiB, plain {plain:.0f} MiB")
    assert plain >= 400, f"control: the plain formula should need ~512 MiB, measured {plain:.0f} MiB"
    assert chunked <= 64, f"chunked attention raised the peak by {chunked:.0f} MiB"


@pytest.mark.parametrize("mode", ["sdpa", "chunked"])
def test_unet_traces_without_graph_breaks(mode):
    """Fast mode on CUDA runs torch.compile on the UNet: a graph break (the attention setting once
    read a ContextVar, which dynamo cannot trace) would silently fall back to eager per block."""
    import torch._dynamo

    from sdlite.checkpoint import build_model
    from sdlite.config import TINY

    with torch.device("meta"):
        unet = build_model("unet", TINY)
    unet = unet.to_empty(device="cpu").eval()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, TINY.text.width)
    torch._dynamo.reset()
    with attention_mode(mode, 16):
        explanation = torch._dynamo.explain(unet)(x, t, c)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_attention_setting_is_marked_constant_without_importing_dynamo():
    """`_current_setting` carries torch.compiler.assume_constant_result's mark, set directly: the
    decorator sets exactly this attribute (if a torch release changes that, this fails, as does
    the graph-break test above), and importing sdlite or building its models no longer imports
    torch._dynamo (1 s of each process's start)."""
    from sdlite import attention as attn

    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == {"_dynamo_marked_constant": True}
    assert attn._current_setting._dynamo_marked_constant is True
    code = textwrap.dedent("""
        import sys, torch, sdlite.pipeline, sdlite.cli
        from sdlite.checkpoint import build_model
        from sdlite.config import TINY
        with torch.device("meta"):  # as loading builds them (nn.Embedding's init once imported dynamo)
            models = [build_model(c, TINY) for c in ("text", "unet", "vae")]
        print("torch._dynamo" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip().splitlines()[-1] == "False"
