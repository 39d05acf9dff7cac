"""Memory behaviour: one model resident at a time, storage vs compute dtype."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite import tiling
from sdlite.checkpoint import export_checkpoint, open_checkpoint
from sdlite.pipeline import StableDiffusion
from sdlite.precision import CastLinear, weights_dtype

PROMPT = "a watercolor fox"


def _image(seed=0, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _track(sd: StableDiffusion):
    """Record which models are resident whenever any model runs."""
    seen = []
    real_load = sd.load_component

    def load(component):
        model = real_load(component)
        model.register_forward_pre_hook(lambda m, a: seen.append((component, tuple(sd.resident_components()))))
        if component == "vae":  # encode/decode are not forward(): wrap them
            for name in ("encode", "decode"):
                fn = getattr(model, name)
                setattr(model, name, lambda *a, _fn=fn, **k: (seen.append(("vae", tuple(sd.resident_components()))),
                                                               _fn(*a, **k))[1])
        return model

    sd.load_component = load
    return seen


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_low_memory_keeps_one_model_resident_and_changes_nothing(tiny, mode):
    low = StableDiffusion(tiny.folder, memory="low")
    assert low.resident_components() == [] and low.checkpoint.tensors is None
    seen = _track(low)
    normal = StableDiffusion(tiny.folder)
    assert normal.resident_components() == ["text", "unet", "vae"]
    run = {
        "txt2img": lambda sd: sd.txt2img(PROMPT, width=32, height=32, steps=3, seed=5, sampler="euler_a"),
        "img2img": lambda sd: sd.img2img(PROMPT, _image(), steps=4, strength=0.5, seed=5),
        "inpaint": lambda sd: sd.inpaint(PROMPT, _image(), _image(1).convert("L"), steps=3, seed=5),
    }[mode]
    a, b = run(low), run(normal)
    # low mode runs the CFG halves as two calls: equal up to the last bits of batched matmuls
    assert (a.latents - b.latents).abs().max() <= 1e-5 * max(1, b.latents.abs().max())
    assert seen, "no model ran"
    assert all(resident == (component,) for component, resident in seen), seen
    assert [c for c, _ in seen][0] == "text" and [c for c, _ in seen][-1] == "vae"
    assert low.resident_components() == []


def test_fp16_weights_compute_in_fp32_without_a_full_copy(tiny, tmp_path):
    half = export_checkpoint(tiny.folder, tmp_path / "half.safetensors", dtype=torch.float16)
    sd = StableDiffusion(half, dtype=torch.float32)
    assert weights_dtype(sd.unet) == torch.float16  # weights stay as stored (memory-mapped)
    assert isinstance(sd.unet.time_embed[0], CastLinear)
    # Reference: the same weights converted to fp32 up front.
    ck = open_checkpoint(half)
    unet32 = ck.load("unet", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 600.0]), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        assert torch.equal(sd.unet(x, t, c), unet32(x, t, c))
    res = sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=1)
    assert res.latents.dtype == torch.float32 and torch.isfinite(res.latents).all()


_MALLOC = r"""
import resource, sys
import torch
from sdlite.pipeline import LOW_MMAP_THRESHOLD, _give_back_freed_memory, _malloc_for_low_memory

def rss():  # resident memory of this process now, in MiB
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def faults_of_cycles(n=50, numel=1 << 20):  # page faults of n tensors (4 MiB), each filled and freed in turn
    torch.ones(numel)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(numel)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

_malloc_for_low_memory()  # the other stages: blocks of 128 KiB or more get their own pages
other = faults_of_cycles()
other_16 = faults_of_cycles(numel=4 << 20)
_malloc_for_low_memory("vae")  # 16 MiB blocks (above the UNet stage's threshold) reused too
vae_16 = faults_of_cycles(numel=4 << 20)
_malloc_for_low_memory()
_give_back_freed_memory()
_malloc_for_low_memory("unet")
unet = faults_of_cycles()
base = rss()
blocks = [torch.ones(1 << 20) for _ in range(50)]  # 200 MiB, then freed: the heap keeps it for reuse
del blocks
kept = rss() - base
_give_back_freed_memory()  # the stage ended
trimmed = rss() - base
big = torch.ones(LOW_MMAP_THRESHOLD // 4 + 1)  # its own mapping: returned when freed
del big
print(other, unet, round(kept), round(trimmed), round(rss() - base), other_16, vae_16)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc; reads /proc/self/status")
def test_low_memory_malloc_reuses_freed_blocks_in_the_unet_and_vae_stages_and_trims_after():
    """Low mode's malloc policy, in a fresh process. In the VAE stage 16 MiB blocks are reused
    (below LOW_VAE_MMAP_THRESHOLD). In the UNet stage a freed block below
    LOW_MMAP_THRESHOLD is reused by the next tensors: 50 tensors of 4 MiB made and freed in turn
    fault in a few blocks' pages at most (measured 0-3072; the other stages: 1024 pages each);
    freed heap memory stays during the stage and goes back to the OS when `done_with` trims it;
    larger tensors are returned at once."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_MALLOC)], capture_output=True, text=True,
                         timeout=120, check=True)
    other, unet, kept, trimmed, after_big, other_16, vae_16 = map(int, run.stdout.split())
    print(f"[malloc] page faults of 50 x 4 MiB: other stages {other}, UNet stage {unet}; freed 200 MiB kept "
          f"{kept} MiB, after trim {trimmed} MiB, after a big block {after_big} MiB; 50 x 16 MiB: other "
          f"stages {other_16}, VAE stage {vae_16}")
    assert other_16 >= 160 * 1024 and vae_16 <= other_16 // 10, (other_16, vae_16)
    assert other >= 40 * 1024, f"control: fresh pages for each 4 MiB tensor expected, {other} faults"
    # reused blocks fault nothing; a few fresh ones (small tensors splitting a freed block) may
    assert unet <= other // 10, f"the UNet stage faulted in {unet} pages for 50 reused 4 MiB blocks ({other})"
    assert kept >= 150, f"the heap gave back freed blocks during the stage ({kept} MiB kept of 200)"
    assert trimmed <= 20 and after_big <= 20, (trimmed, after_big)


def test_low_memory_trims_the_heap_when_each_stage_ends(tiny, monkeypatch):
    """Each stage's heap is trimmed after its model is gone (a model still referenced when the
    trim runs would leave its freed memory in the heap through the next stage)."""
    import weakref

    from sdlite import pipeline

    sd = StableDiffusion(tiny.folder, memory="low")
    loaded = []
    real_load = sd.load_component
    sd.load_component = lambda component: loaded.append(weakref.ref(model := real_load(component))) or model
    alive_at_trims = []
    monkeypatch.setattr(pipeline, "_give_back_freed_memory",
                        lambda: alive_at_trims.append(sum(ref() is not None for ref in loaded)))
    sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=1)
    sd.img2img(PROMPT, _image(), steps=2, strength=0.5, seed=1)
    assert len(loaded) == 7  # text, UNet, VAE; text, VAE (encode), UNet, VAE
    assert len(alive_at_trims) == 14 and not any(alive_at_trims), alive_at_trims  # at each load and each end


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_reduced_dtype_the_cpu_only_emulates_computes_in_float32(tiny, tmp_path, dtype, monkeypatch):
    """fp16/bf16 compute on a CPU without the instructions is many times slower than float32:
    the pipeline warns, stores the weights in the asked dtype and computes in float32."""
    from sdlite import precision

    monkeypatch.setattr(precision, "cpu_slowdown", lambda d: 37.0)
    with pytest.warns(UserWarning, match=r"compute is 37x slower than float32 on this CPU.*weights stored in"):
        sd = StableDiffusion(tiny.folder, dtype=dtype)
    assert sd.dtype == torch.float32 and sd.storage_dtype == dtype
    assert all(weights_dtype(m) == dtype for m in (sd.text_encoder, sd.unet, sd.vae))
    assert isinstance(sd.unet.time_embed[0], CastLinear)
    # the same as the weights exported in that dtype, computed in float32
    stored = export_checkpoint(tiny.folder, tmp_path / "stored.safetensors", dtype=dtype)
    a = sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=4)
    b = StableDiffusion(stored, dtype=torch.float32).txt2img(PROMPT, width=32, height=32, steps=2, seed=4)
    assert torch.equal(a.latents, b.latents)
    low = StableDiffusion(tiny.folder, dtype=dtype, memory="low", quantize="int8")
    assert low.dtype == torch.float32 and weights_dtype(low.resident("vae")) == dtype


def test_a_reduced_dtype_the_cpu_runs_fast_is_kept(tiny, monkeypatch):
    import warnings

    from sdlite import precision

    monkeypatch.setattr(precision, "cpu_slowdown", lambda d: 1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = StableDiffusion(tiny.folder, dtype=torch.bfloat16)
    assert sd.dtype == torch.bfloat16 and sd.storage_dtype is None and weights_dtype(sd.unet) == torch.bfloat16


def test_cpu_slowdown_probe():
    """The probe measures: float32 against itself is about 1; on an x86 CPU without fp16
    arithmetic instructions fp16 is emulated, many times slower."""
    from pathlib import Path

    from sdlite.precision import CPU_SLOWDOWN_LIMIT, cpu_slowdown

    assert 0.2 < cpu_slowdown(torch.float32) < 5
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if " avx512f" in flags and not any(f in flags for f in (" avx512_fp16", " amx_fp16")):
        assert cpu_slowdown(torch.float16) > CPU_SLOWDOWN_LIMIT


@pytest.mark.parametrize("memory", ["normal", "low"])
def test_cfg_batch_option_sets_how_the_guidance_halves_run(tiny, memory):
    """cfg_batch=True: one batch-2 UNet call per step (the latent once, with both contexts),
    False: two batch-1 calls, None: one call except in low mode on the CPU; the latents agree
    within float rounding. Recorded per call: (latents, contexts)."""
    batches, latents = {}, {}
    for option in (None, True, False):
        sd = StableDiffusion(tiny.folder, memory=memory, cfg_batch=option)
        sizes = batches[option] = []
        real_load = sd.load_component

        def load(component, real_load=real_load, sizes=sizes):
            model = real_load(component)
            if component == "unet":
                model.register_forward_pre_hook(lambda m, a: sizes.append((a[0].shape[0], a[2].shape[0])))
            return model
        sd.load_component = load
        if sd.unet is not None:
            sd.unet.register_forward_pre_hook(lambda m, a, sizes=sizes: sizes.append((a[0].shape[0], a[2].shape[0])))
        latents[option] = sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=4, sampler="ddim").latents
    assert batches[True] == [(1, 2)] * 2 and batches[False] == [(1, 1)] * 4
    assert batches[None] == (batches[False] if memory == "low" else batches[True])
    for option in (True, False):
        assert (latents[option] - latents[None]).abs().max() <= 1e-5 * max(1, latents[None].abs().max())


def test_low_memory_batches_the_guidance_halves_on_a_gpu_up_to_one_512_image(tiny):
    sd = StableDiffusion(tiny.folder, memory="low")
    assert not sd._batches_cfg(torch.empty(1, 4, 64, 64))  # the CPU: always two calls in low mode
    sd.device = torch.device("cuda")  # only the rule is asked here, nothing runs
    assert sd._batches_cfg(torch.empty(1, 4, 64, 64)) and sd._batches_cfg(torch.empty(1, 4, 48, 80))
    assert sd._batches_cfg(torch.empty(2, 4, 32, 64))  # batch_size images count together
    assert not sd._batches_cfg(torch.empty(1, 4, 64, 72)) and not sd._batches_cfg(torch.empty(1, 4, 128, 128))
    assert not sd._batches_cfg(torch.empty(2, 4, 64, 64))
    sd.cfg_batch = False
    assert not sd._batches_cfg(torch.empty(1, 4, 64, 64))


def test_plain_vae_passes_only_on_cuda_in_high_memory_or_fast_mode(tiny):
    """Speed before memory: memory="high" and fast mode outside low mode, on CUDA, ask the VAE
    front doors for the one-call pass (tiling.plain_fits decides per image); the CPU and
    normal/low modes without fast never, low mode never."""
    sd = StableDiffusion(tiny.folder, memory="low")
    assert not sd._plain_vae
    sd.device = torch.device("cuda")  # only the rule is asked here, nothing runs
    for memory, fast, plain in (("low", False, False), ("normal", False, False), ("high", False, True),
                                ("normal", True, True), ("high", True, True), ("low", True, False)):
        sd.memory, sd.fast = memory, fast
        assert sd._plain_vae is plain, (memory, fast)


def test_vae_stages_pass_the_plain_rule_to_the_front_doors(tiny, monkeypatch):
    """decode (txt2img), encode (img2img) and the float32 retry of a NaN decode all pass
    `_plain_vae` on."""
    seen = []
    for name in ("decode", "encode"):
        real = getattr(tiling, name)
        monkeypatch.setattr(tiling, name, lambda *a, plain=False, real=real, name=name, **k:
                            (seen.append((name, plain)), real(*a, **k))[1])
    sd = StableDiffusion(tiny.folder, memory="high")
    init = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    sd.txt2img(PROMPT, width=32, height=32, steps=1, seed=1, sampler="ddim")
    sd.img2img(PROMPT, init, strength=0.5, steps=2, seed=1, sampler="ddim")
    assert seen == [("decode", False), ("encode", False), ("decode", False)]
    seen.clear()
    monkeypatch.setattr(StableDiffusion, "_plain_vae", property(lambda self: True))
    sd.txt2img(PROMPT, width=32, height=32, steps=1, seed=1, sampler="ddim")
    sd.img2img(PROMPT, init, strength=0.5, steps=2, seed=1, sampler="ddim")
    assert seen == [("decode", True), ("encode", True), ("decode", True)]
    # a reduced-precision decode that gives NaN is retried in float32, with the same rule
    seen.clear()
    sd.dtype = torch.float16
    calls = []
    real_decode = tiling.decode

    def nan_once(vae, z, *a, plain=False, **k):  # the tiny VAE is float32: so is the first call here
        calls.append(plain)
        out = real_decode(vae, z.float(), *a, plain=plain, **k)
        return out * float("nan") if len(calls) == 1 else out
    monkeypatch.setattr(tiling, "decode", nan_once)
    with pytest.warns(UserWarning, match="retrying in float32"):
        sd.decode(torch.zeros(1, 4, 4, 4))
    assert calls == [True, True]


def test_unknown_memory_mode_is_an_error(tiny):
    from sdlite.errors import InputError

    with pytest.raises(InputError, match="memory must be one of normal, low"):
        StableDiffusion(tiny.folder, memory="tiny")


def test_run_options_give_the_same_image_or_a_bounded_change(tiny):
    """chunked/plain attention and forced VAE tiling change nothing measurable; int8 stays close."""
    from sdlite.attention import get_attention

    base = StableDiffusion(tiny.folder).txt2img(PROMPT, width=32, height=32, steps=3, seed=9)
    for kw in (dict(attention="chunked", attention_chunk=7), dict(attention="plain")):
        res = StableDiffusion(tiny.folder, **kw).txt2img(PROMPT, width=32, height=32, steps=3, seed=9)
        assert (res.latents - base.latents).abs().max() <= 1e-4 * max(1, base.latents.abs().max())
    assert get_attention().mode == "sdpa"  # the setting is restored after each call
    int8 = StableDiffusion(tiny.folder, quantize="int8", memory="low").txt2img(PROMPT, width=32, height=32,
                                                                               steps=3, seed=9)
    rel = ((int8.latents - base.latents).norm() / base.latents.norm()).item()
    print(f"[diff] tiny int8 vs fp32 latents relative L2 {rel:.4f}")
    assert 0 < rel < 0.05


def test_bad_run_options_are_clear_errors(tiny):
    from sdlite.errors import InputError

    for kw, msg in ((dict(quantize="int4"), "quantize must be one of none, int8"),
                    (dict(attention="flash"), "unknown attention mode"),
                    (dict(attention="chunked", attention_chunk=0), "positive integer"),
                    (dict(vae_tiling="maybe"), "vae_tiling must be one of auto, on, off"),
                    (dict(cfg_batch="off"), "cfg_batch must be True, False or None, got 'off'"),
                    (dict(channels_last=1), "channels_last must be True, False or None, got 1")):
        with pytest.raises(InputError, match=msg):
            StableDiffusion(tiny.folder, **kw)


# ---------------------------------------------------------------- parking (memory="normal" on CUDA)


def test_host_copy_switches_the_weights_and_keeps_the_parameters():
    from sdlite import parking
    from sdlite.parking import HostCopy

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        model[1].running_mean.copy_(torch.randn(4, generator=g))
    x = torch.randn(1, 3, 6, 6, generator=g)
    with torch.no_grad():
        expected = model(x)
    params, own = list(model.parameters()), [t.data_ptr() for t in model.state_dict().values()]
    parked = HostCopy(model, pin=False)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert sorted(parked.host) == sorted(names)
    state = model.state_dict()

    def uses(copies):
        return all(state_t.data_ptr() == copies[n].data_ptr() for n, state_t in model.state_dict().items())

    assert uses(parked.host) and not set(own) & {t.data_ptr() for t in state.values()}  # parked at once
    # one buffer: the tensors' bytes plus alignment padding
    data = sum(t.numel() * t.element_size() for t in state.values())
    assert data <= parked.nbytes() < data + parking.ALIGN * len(state)
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == 1
    with torch.inference_mode():  # the pipeline switches inside inference mode
        parked.to_device("cpu")
        device_copies = {n: t for n, t in model.state_dict().items()}
        assert not uses(parked.host)
        assert len({t.untyped_storage().data_ptr() for t in device_copies.values()}) == 1  # one block
        assert torch.equal(model(x), expected)
        parked.to_host()
        assert uses(parked.host) and torch.equal(model(x), expected)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the same Parameter objects
    assert not any(p.is_inference() for p in model.parameters())  # usable outside inference mode
    # The device copies are no longer the model's: only this test still holds them.
    assert not {t.data_ptr() for t in device_copies.values()} & {t.data_ptr() for t in model.state_dict().values()}


def test_host_copy_parts_go_to_the_device_on_their_own():
    from sdlite.parking import REST, HostCopy

    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(3, 5), "dec": torch.nn.Linear(5, 3),
                                 "shared": torch.nn.LayerNorm(3)})
    originals = {n: t.detach().clone() for n, t in model.state_dict().items()}
    parked = HostCopy(model, {"encoder": ("enc.",), "decoder": ("dec.",)}, pin=False)
    assert parked.parts == {"encoder": ["enc.weight", "enc.bias"], "decoder": ["dec.weight", "dec.bias"],
                            REST: ["shared.weight", "shared.bias"]}
    lo, hi = parked.ranges["decoder"]
    assert lo % 64 == 0 and hi - lo >= 5 * 3 * 4 + 3 * 4
    parked.to_device("cpu", "decoder")
    assert parked.where == {"encoder": "host", "decoder": "device", REST: "device"}
    on_host = {n for n, t in model.state_dict().items() if t.data_ptr() == parked.host[n].data_ptr()}
    assert on_host == {"enc.weight", "enc.bias"}
    assert all(torch.equal(t, originals[n]) for n, t in model.state_dict().items())
    decoder_copy = model["dec"].weight.data_ptr()
    parked.to_device("cpu")  # all of it; the decoder keeps the copy it has
    assert set(parked.where.values()) == {"device"} and model["dec"].weight.data_ptr() == decoder_copy
    parked.to_host()
    assert set(parked.where.values()) == {"host"}
    assert all(t.data_ptr() == parked.host[n].data_ptr() for n, t in model.state_dict().items())


def _parking_states(sd: StableDiffusion):
    """Record, whenever a layer computes, which parts of the parked models are on the device,
    and every layer that computed with a host copy (on CUDA: host weights, device inputs)."""
    seen, on_host = [], []

    def on_device():  # the parts (with tensors) of parked models that are on the device
        return frozenset(f"{c}.{part}".rstrip(".") for c, p in sd._parked.items() for part, where in p.where.items()
                         if where == "device" and p.parts[part])

    def host_ranges():
        return [(p.buffer.data_ptr(), p.buffer.data_ptr() + p.nbytes()) for p in sd._parked.values()]

    def record(component, name):
        def hook(module, args):
            seen.append((component, on_device()))
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if any(lo <= t.data_ptr() < hi for lo, hi in host_ranges()):
                    on_host.append(f"{component}: {name}")
        return hook

    for component, attr in (("text", "text_encoder"), ("unet", "unet"), ("vae", "vae")):
        for name, m in getattr(sd, attr).named_modules():
            if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)):
                m.register_forward_pre_hook(record(component, name))
    return seen, on_host


RUNS = {
    "txt2img": lambda m: m.txt2img(PROMPT, width=32, height=32, steps=3, seed=5),
    "img2img": lambda m: m.img2img(PROMPT, _image(), steps=4, strength=0.5, seed=5),
    "inpaint-batch": lambda m: m.inpaint(PROMPT, _image(), _image(1).convert("L"), steps=3, seed=5, batch_size=2),
}


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint-batch", "txt2img-int8"])
def test_normal_memory_parks_text_encoder_and_vae_between_their_stages(tiny, mode, monkeypatch):
    """On CUDA the text encoder and VAE wait in host memory unless their stage runs; the CPU's
    memory is the host's, so parking is forced here to test the bookkeeping and the results.
    int8: the parked text encoder mixes int8 weights and float32 scales in one buffer."""
    from sdlite import parking

    options = dict(quantize="int8") if mode.endswith("int8") else {}
    monkeypatch.setattr(parking, "SEPARATE_MEMORY", ("cpu",))
    high, low = StableDiffusion(tiny.folder, memory="high", **options), StableDiffusion(tiny.folder, memory="low")
    assert high._parked == {} and low._parked == {}  # only "normal" parks
    sd = StableDiffusion(tiny.folder, **options)
    if options:
        assert {t.dtype for t in sd._parked["text"].host.values()} >= {torch.int8, torch.float32}
    assert sd.resident_components() == ["text", "unet", "vae"]
    parked = {c: set(p.where.values()) for c, p in sd._parked.items()}
    assert parked == {"text": {"host"}, "vae": {"host"}}
    seen, on_host = _parking_states(sd)
    run = RUNS[mode.removesuffix("-int8")]
    a, b = run(sd), run(high)
    assert torch.equal(a.latents, b.latents)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))
    assert not on_host, f"layers ran on host copies: {on_host[:5]}"
    states = {component: set() for component in ("text", "unet", "vae")}
    for component, where in seen:
        states[component].add(where)
    # Only the running model is on the device, and of the VAE only the half that runs.
    encodes = mode in ("img2img", "inpaint-batch")
    vae = {frozenset({"vae.decoder"})} | ({frozenset({"vae.encoder"})} if encodes else set())
    assert states == {"text": {frozenset({"text"})}, "unet": {frozenset()}, "vae": vae}, states
    assert {c: set(p.where.values()) for c, p in sd._parked.items()} == parked
    # Again, with the host copies changed: the device copies are made afresh from them each time
    # (and nothing derived from an earlier copy, e.g. packed CPU weights, is used).
    assert torch.equal(run(sd).latents, b.latents)
    sd._parked["vae"].buffer.zero_()
    again = run(sd)
    assert encodes or torch.equal(again.latents, b.latents)
    assert not np.array_equal(np.asarray(again.images[0]), np.asarray(b.images[0]))
    sd._parked["text"].buffer.zero_()
    assert not torch.equal(run(sd).latents, again.latents)


def test_a_stage_that_fails_still_parks_its_model(tiny, monkeypatch):
    from sdlite import parking, tiling

    monkeypatch.setattr(parking, "SEPARATE_MEMORY", ("cpu",))
    sd = StableDiffusion(tiny.folder)

    def broken(*args, **kwargs):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(tiling, "decode", broken)
    with pytest.raises(RuntimeError, match="decode failed"):
        sd.txt2img(PROMPT, width=32, height=32, steps=2, seed=1)
    assert {c: set(p.where.values()) for c, p in sd._parked.items()} == {"text": {"host"}, "vae": {"host"}}


def test_a_replaced_or_requantized_model_is_parked_again(tiny, monkeypatch):
    """A VAE from a file (vae=, cli --vae) and one handed over by replace() are parked at once;
    layers swapped in place (quantize_model) make the host copy stale, so it is made again
    instead of writing old weights into them."""
    from sdlite import parking
    from sdlite.quantize import Int8Linear, quantize_model
    from sdlite.vaefile import load_vae

    monkeypatch.setattr(parking, "SEPARATE_MEMORY", ("cpu",))
    high = StableDiffusion(tiny.folder, memory="high")
    sd = StableDiffusion(tiny.folder, vae=tiny.folder / "vae")
    assert sd._parked["vae"].model is sd.vae and set(sd._parked["vae"].where.values()) == {"host"}
    old_vae = sd.vae
    sd.replace("vae", sd.prepare("vae", load_vae(tiny.folder / "vae", sd.config.vae)))
    assert sd.vae is not old_vae and sd._parked["vae"].model is sd.vae
    assert set(sd._parked["vae"].where.values()) == {"host"}
    assert all(t.device.type == "cpu" for t in sd.vae.parameters())
    quantize_model(sd.text_encoder)
    quantize_model(high.text_encoder)
    assert any(isinstance(m, Int8Linear) for m in sd.text_encoder.modules())
    a, b = (m.txt2img(PROMPT, width=32, height=32, steps=2, seed=3) for m in (sd, high))
    assert torch.equal(a.latents, b.latents)
    assert any(t.dtype == torch.int8 for t in sd._parked["text"].host.values())


def test_parking_applies_to_cuda_normal_mode_only(tiny):
    from sdlite import parking

    assert parking.parks(torch.device("cuda")) and not parking.parks(torch.device("cpu"))
    assert not parking.parks(torch.device("mps"))  # shared memory: nothing to gain
    sd = StableDiffusion(tiny.folder)  # CPU: nothing parked, nothing copied
    assert sd._parked == {} and not sd._parks("text")
