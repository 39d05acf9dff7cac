"""sdlite samplers and schedules against diffusers' schedulers and CompVis' PLMS, run here.

Every reference is executed inside the test on the same starting noise (and the same injected
noise for stochastic samplers); final latents are compared in VP scaling (what the VAE decodes)
with max |diff| <= 1e-5 * max(1, max |reference|).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)

from sdlite import samplers, schedule
from sdlite.errors import InputError

# SD v1.5's scheduler_config.json (a PNDMScheduler). It has no `timestep_spacing`, so every
# scheduler class built from it keeps its own default (see test_reference_spacing_defaults).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
REFERENCE = {
    "plms": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5


class EulerAncestralKarras(EulerAncestralDiscreteScheduler):
    """diffusers has no Karras option for Euler a: graft EulerDiscreteScheduler's Karras schedule."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        donor = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
        donor.set_timesteps(num_inference_steps, device)
        self.sigmas, self.timesteps = donor.sigmas, donor.timesteps


def reference_scheduler(name, **overrides):
    """diffusers' scheduler for `name` from SD1.5's config; unset options keep the class defaults."""
    if name == "euler_a" and overrides.pop("use_karras_sigmas", False):
        return EulerAncestralKarras.from_config(reference_scheduler(name, **overrides).config)
    cls = REFERENCE[name]
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in SD15.items() if k in accepted}  # what from_config would keep
    if cls is DPMSolverMultistepScheduler:
        config.update(algorithm_type="dpmsolver++", solver_order=2)
    return cls(**{**config, **overrides})


def toy_eps(x, t, context=None):
    """Smooth eps model that reacts to x and to the exact (float) timestep."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)  # diffusers passes a 0-d t
    return 0.1 * x * torch.cos(t / 300) + 0.05 * torch.sin(x + t / 100)


def start_noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_run(sched, steps, noise, eps_fn=toy_eps, step_kwargs=lambda i: {}):
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = eps_fn(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, **step_kwargs(i)).prev_sample
    return x


@torch.no_grad()
def sdlite_run(name, steps, noise, table, *, karras=False, spacing=None, eps_fn=toy_eps, **options):
    sigmas = samplers.get_sigmas(name, steps, karras, spacing=spacing, alphas_cumprod=table)
    interpolation = samplers.timestep_interpolation(name, karras, spacing=spacing)
    model = samplers.Denoiser(eps_fn, table, interpolation=interpolation).bind(None)
    x = noise * samplers.initial_noise_scale(name, sigmas, spacing=spacing)
    x = samplers.SAMPLERS[name](model, x, sigmas, **options)
    return samplers.to_vp(x, sigmas[-1])


def assert_matches(actual, expected, what):
    diff = (actual - expected).abs().max().item()
    tol = TOL * max(1.0, expected.abs().max().item())
    print(f"\n[maxdiff] {what}: {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def seeded_noise_sampler(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen)


# ---------------------------------------------------------------------------------------------
# Schedules


def compvis_alphas_cumprod():
    # CompVis make_beta_schedule("linear") + DDPM.register_schedule: float64, stored as float32.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def test_alphas_cumprod_is_compvis_and_close_to_diffusers():
    ours = schedule.alphas_cumprod()
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    torch.testing.assert_close(ours, compvis_alphas_cumprod(), rtol=0, atol=0)
    # diffusers computes in float32: not the same table, but within 5e-7 (documented in schedule.py)
    theirs = reference_scheduler("euler").alphas_cumprod
    diff = (ours - theirs).abs().max().item()
    differ = int((ours != theirs).sum())
    print(f"\n[maxdiff] alphas_cumprod CompVis vs diffusers: {diff:.3g} ({differ} entries differ)")
    assert 0 < diff < 5e-7


def test_leading_timesteps_refuse_step_counts_past_the_table():
    # 1000 steps with offset 1 would need t = 1000 (diffusers lists it too, then indexes past
    # its 1000-entry alphas table in step()); sdlite refuses up front.
    assert schedule.leading_timesteps(999)[0].item() == 999
    with pytest.raises(InputError, match="at most 999"):
        schedule.leading_timesteps(1000)


@pytest.mark.parametrize("steps", [1, 3, 6, 7, 10, 50, 999])
def test_leading_timesteps_match_diffusers_and_compvis(steps):
    ours = schedule.leading_timesteps(steps)
    sched = reference_scheduler("ddim")
    sched.set_timesteps(steps)
    assert ours.tolist() == sched.timesteps.tolist()
    compvis = np.asarray(list(range(0, 1000, 1000 // steps))) + 1  # make_ddim_timesteps "uniform"
    if 1000 % steps == 0:
        assert ours.flip(0).tolist() == compvis.tolist()
    else:  # CompVis runs a different number of steps (and indexes t = 1000 for 3 steps)
        assert len(compvis) != steps


def test_ddim_sigmas_end_at_sigma_of_t0():
    table = schedule.discrete_sigmas()
    sig = schedule.ddim_sigmas(10)
    assert sig.tolist() == table[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]].tolist()


def reference_sigmas(name, steps, **config):
    sched = reference_scheduler(name, **config)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas
    return sigmas.unique_consecutive() if name == "heun" else sigmas  # Heun repeats inner sigmas


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [2, 5, 20, 50])
def test_sigmas_match_diffusers(name, karras, steps):
    table = reference_scheduler(name).alphas_cumprod
    ours = samplers.get_sigmas(name, steps, karras, alphas_cumprod=table)
    theirs = reference_sigmas(name, steps, use_karras_sigmas=karras)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_linspace_single_step_follows_k_diffusion():
    # diffusers' np.linspace(0, 999, 1)[::-1] = [0]: one Euler step from the *least* noisy level
    # (init_noise_sigma 0.029). We start from t = 999 like k-diffusion (torch.linspace(999, 0, 1)).
    assert reference_sigmas("euler", 1)[0] < 0.03
    assert samplers.get_sigmas("euler", 1)[0] == schedule.discrete_sigmas()[-1]


def test_normal_schedule_differs_from_k_diffusion_interpolation():
    # Same fractional timesteps, sigma interpolated linearly (diffusers) vs in log space (k-diffusion).
    table = schedule.discrete_sigmas()
    t = schedule.linspace_timesteps(50)
    lin, log = schedule.sigmas_at(t, table, "linear"), schedule.sigmas_at(t, table, "log")
    rel = ((lin - log).abs() / log).max().item()
    print(f"\n[maxdiff] linear vs log-sigma interpolation, 50 steps: {rel:.3g} relative")
    assert 1e-5 < rel < 1e-3


@pytest.mark.parametrize(
    "name, karras, spacing",
    [("ddim", False, None), ("euler", False, None), ("euler", True, None), ("heun", False, None),
     ("euler", False, "leading"), ("euler_a", True, "leading"), ("dpmpp_2m", False, None),
     ("dpmpp_2m", True, None)],
)
def test_denoiser_timesteps_match_diffusers(name, karras, spacing):
    steps = 13
    overrides = {"use_karras_sigmas": karras} if name != "ddim" else {}
    if spacing:
        overrides["timestep_spacing"] = spacing
    sched = reference_scheduler(name, **overrides)
    sched.set_timesteps(steps)
    table = sched.alphas_cumprod
    sigmas = samplers.get_sigmas(name, steps, karras, spacing=spacing, alphas_cumprod=table)
    interpolation = samplers.timestep_interpolation(name, karras, spacing=spacing)
    ts = samplers.Denoiser(toy_eps, table, interpolation=interpolation).sigma_to_t(sigmas[:-1])
    expected = sched.timesteps.to(torch.float32).unique_consecutive()  # Heun repeats them
    torch.testing.assert_close(ts, expected, rtol=0, atol=2e-4)
    if not karras and (name in ("ddim", "dpmpp_2m") or spacing == "leading"):
        assert torch.equal(ts, ts.round())  # table sigmas give exact integer timesteps


def test_reference_spacing_defaults(tmp_path):
    # How diffusers users get a scheduler for SD1.5: Class.from_config(pipe.scheduler.config).
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15))
    pndm = PNDMScheduler.from_pretrained(tmp_path)
    spacing = {n: c.from_config(pndm.config).config.timestep_spacing for n, c in REFERENCE.items()}
    assert spacing == {"plms": "leading", "ddim": "leading", "euler": "linspace", "euler_a": "linspace",
                       "heun": "linspace", "dpmpp_2m": "linspace"}


# ---------------------------------------------------------------------------------------------
# Samplers vs diffusers on the toy model (same alphas_cumprod table as the reference)


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 10, 20])
def test_plms_matches_pndm(steps):
    sched = reference_scheduler("plms")
    expected = diffusers_run(sched, steps, start_noise())
    actual = sdlite_run("plms", steps, start_noise(), sched.alphas_cumprod)
    assert_matches(actual, expected, f"plms {steps} steps vs PNDM")


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 20])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(steps, eta):
    sched = reference_scheduler("ddim")
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps)]
    step_kwargs = (lambda i: {"eta": eta, "variance_noise": noises[i]}) if eta else (lambda i: {})
    expected = diffusers_run(sched, steps, start_noise(), step_kwargs=step_kwargs)
    replay = iter(noises)
    actual = sdlite_run("ddim", steps, start_noise(), sched.alphas_cumprod, eta=eta,
                        noise_sampler=lambda s, sn: next(replay))
    assert_matches(actual, expected, f"ddim eta={eta} {steps} steps")
    assert next(replay, None) is None or eta == 0  # CompVis adds noise on every step, the last too


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 20])
def test_euler_family_matches_diffusers(name, karras, steps):
    sched = reference_scheduler(name, use_karras_sigmas=karras)
    step_kwargs = lambda i: {}  # noqa: E731
    options = {}
    if name == "euler_a":  # same seeded generator on both sides: identical per-step noise
        gen = torch.Generator().manual_seed(7)
        step_kwargs = lambda i: {"generator": gen}  # noqa: E731
        options["noise_sampler"] = seeded_noise_sampler(7)
    expected = diffusers_run(sched, steps, start_noise(), step_kwargs=step_kwargs)
    actual = sdlite_run(name, steps, start_noise(), sched.alphas_cumprod, karras=karras, **options)
    assert_matches(actual, expected, f"{name} karras={karras} {steps} steps")


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_family_leading_spacing(name, karras):
    steps = 10
    sched = reference_scheduler(name, use_karras_sigmas=karras, timestep_spacing="leading")
    step_kwargs, options = (lambda i: {}), {}
    if name == "euler_a":
        gen = torch.Generator().manual_seed(3)
        step_kwargs, options = (lambda i: {"generator": gen}), {"noise_sampler": seeded_noise_sampler(3)}
    expected = diffusers_run(sched, steps, start_noise(), step_kwargs=step_kwargs)
    actual = sdlite_run(name, steps, start_noise(), sched.alphas_cumprod, karras=karras,
                        spacing="leading", **options)
    assert_matches(actual, expected, f"{name} leading karras={karras} {steps} steps")


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 20])
def test_dpmpp_2m_matches_diffusers(steps, karras):
    sched = reference_scheduler("dpmpp_2m", use_karras_sigmas=karras)
    expected = diffusers_run(sched, steps, start_noise())
    actual = sdlite_run("dpmpp_2m", steps, start_noise(), sched.alphas_cumprod, karras=karras)
    assert_matches(actual, expected, f"dpmpp_2m karras={karras} {steps} steps")


def test_default_table_is_within_design_tolerance_of_diffusers():
    # Our CompVis alphas_cumprod vs diffusers' float32 one moves results by ~1e-5 relative.
    sched = reference_scheduler("euler")
    expected = diffusers_run(sched, 20, start_noise())
    actual = sdlite_run("euler", 20, start_noise(), None)
    diff = (actual - expected).abs().max().item()
    print(f"\n[maxdiff] euler 20 steps, CompVis table vs diffusers: {diff:.3g}")
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# PLMS against CompVis' PLMSSampler, re-derived here in its own VP form


@torch.no_grad()
def compvis_plms(eps_fn, x, steps, ac, skip=0):
    """CompVis PLMSSampler.plms_sampling / p_sample_plms (eta 0, no guidance), written in VP;
    `skip` leaves out the first timesteps (x is then at the first one run), history fresh."""
    ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    a = ac[ts]
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    time_range = ts[::-1]
    old_eps = []
    for i, t in enumerate(time_range):
        if i < skip:
            continue
        index = len(ts) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]

        def step(e):
            pred_x0 = (x - (1 - a[index]).sqrt() * e) / a[index].sqrt()
            return a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e

        e_t = eps_fn(x, torch.tensor(float(t)))
        if not old_eps:
            e_prime = (e_t + eps_fn(step(e_t), torch.tensor(float(t_next)))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step(e_prime)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 25, 50])
def test_plms_matches_compvis(steps):
    # CompVis x_T is unit noise in VP scaling; sdlite gets it through initial_noise_scale.
    ac = compvis_alphas_cumprod()
    expected = compvis_plms(toy_eps, start_noise(), steps, ac)
    actual = sdlite_run("plms", steps, start_noise(), None)
    assert_matches(actual, expected, f"plms {steps} steps vs CompVis")


@pytest.mark.parametrize("steps", [2, 10, 25, 50])
def test_pndm_equals_compvis_plms(steps):
    # The two references agree with each other for >= 2 steps (PNDM eq. 9 is the DDIM step
    # rearranged; its doubled first timestep replays the pseudo improved Euler step).
    ac = reference_scheduler("plms").alphas_cumprod
    expected = compvis_plms(toy_eps, start_noise(), steps, ac)
    actual = diffusers_run(reference_scheduler("plms"), steps, start_noise())
    assert_matches(actual, expected, f"PNDM vs CompVis PLMS {steps} steps")


@pytest.mark.parametrize("steps,strength", [(10, 0.6), (20, 0.5)])
def test_plms_img2img_is_compvis_plms_from_the_truncation_point(steps, strength):
    """img2img with PLMS (CompVis' img2img script runs DDIM only): the CompVis PLMS loop over the
    last int(steps * strength) timesteps, its history fresh, from the image noised to the first.
    diffusers' PNDM img2img differs: it cuts its timestep list, whose first timestep is doubled
    for the pseudo improved Euler step, by the step count, so the doubled entry is not where the
    scheduler's counter expects it (README, "Where diffusers differs")."""
    from sdlite.pipeline import _truncate

    ac = compvis_alphas_cumprod()
    init, noise = 0.5 * start_noise(1), start_noise(2)
    run = int(steps * strength)
    t0 = (np.asarray(list(range(0, 1000, 1000 // steps))) + 1)[::-1][steps - run]
    expected = compvis_plms(toy_eps, ac[t0].sqrt() * init + (1 - ac[t0]).sqrt() * noise, steps, ac, skip=steps - run)
    sigmas = _truncate(samplers.get_sigmas("plms", steps, False, alphas_cumprod=ac), steps, strength)
    model = samplers.Denoiser(toy_eps, ac).bind(None)
    with torch.no_grad():
        actual = samplers.to_vp(samplers.sample_plms(model, init + noise * sigmas[0], sigmas), sigmas[-1])
    assert_matches(actual, expected, f"plms img2img {steps} steps, strength {strength} vs CompVis loop")

    sched = reference_scheduler("plms")  # diffusers' img2img pipeline's loop, on the same table
    sched.alphas_cumprod = ac.clone()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[steps - run:]
    x = sched.add_noise(init, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(toy_eps(x, t), t, x).prev_sample
    assert (x - expected).abs().max() > 100 * TOL * max(1.0, expected.abs().max().item())


def test_pndm_single_step_is_not_compvis_plms():
    # diffusers PNDM(skip_prk_steps) equals CompVis PLMS for >= 2 steps (tests above). With one
    # step it does a plain DDIM step (1 model call); CompVis still does the pseudo improved Euler
    # step, calling the model a second time at the same timestep (its next-index clamps). We
    # follow CompVis (value parity: test_plms_matches_compvis[1]). With "leading" spacing one step
    # is t = 1 -> 0, so the numbers barely differ; the call count shows the difference.
    def counting(counter):
        def eps_fn(x, t, context=None):
            counter.append((x.clone(), t))
            return toy_eps(x, t)
        return eps_fn

    pndm_calls, compvis_calls, ours_calls = [], [], []
    pndm = diffusers_run(reference_scheduler("plms"), 1, start_noise(), eps_fn=counting(pndm_calls))
    ddim = diffusers_run(reference_scheduler("ddim"), 1, start_noise())
    compvis_plms(counting(compvis_calls), start_noise(), 1, compvis_alphas_cumprod())
    sdlite_run("plms", 1, start_noise(), None, eps_fn=counting(ours_calls))
    torch.testing.assert_close(pndm, ddim, rtol=0, atol=1e-6)  # PNDM eq. 9 = the DDIM step
    assert (len(pndm_calls), len(compvis_calls), len(ours_calls)) == (1, 2, 2)
    assert [float(t[0]) for _, t in ours_calls] == [float(t) for _, t in compvis_calls] == [1.0, 1.0]
    for (ours_x, _), (compvis_x, _) in zip(ours_calls, compvis_calls):  # same UNet inputs too
        torch.testing.assert_close(ours_x, compvis_x, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Denoiser


class Recorder:
    """Fake UNet: records its inputs, output depends on x, t and the context."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), None if context is None else context.clone()))
        return fake_eps(x, t, context)


def fake_eps(x, t, context):
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.3 * x[:, :4] + c + t.view(-1, 1, 1, 1) / 1000


def test_denoiser_cfg_batch_order_and_formula():
    table = schedule.discrete_sigmas()
    sigma, x = table[500], start_noise()
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), -1.0)
    rec = Recorder()
    out = samplers.Denoiser(rec).bind(cond, uncond, 7.5)(x, sigma)
    assert len(rec.calls) == 1
    x_in, t, ctx = rec.calls[0]
    scaled = x / (sigma**2 + 1) ** 0.5
    assert torch.equal(x_in, torch.cat([scaled, scaled]))
    assert torch.equal(ctx, torch.cat([uncond, cond]))
    assert t.tolist() == [500.0] * 4
    eps_u, eps_c = fake_eps(scaled, t[:2], uncond), fake_eps(scaled, t[:2], cond)
    torch.testing.assert_close(out, x - sigma * (eps_u + 7.5 * (eps_c - eps_u)), rtol=1e-6, atol=1e-6)


def test_denoiser_pairs_latents_with_both_contexts():
    """pairs_contexts: the guidance call passes the latents (and inpainting's extra channels)
    once with [uncond, cond], for a UNet that pairs each latent with each context; the result
    is the CFG batch's."""
    sigma, x = schedule.discrete_sigmas()[500], start_noise()
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    extra = torch.randn(2, 5, 8, 8)

    def paired_eps(x, t, context):  # what a pairing UNet computes: x repeated per context group
        k = context.shape[0] // x.shape[0]
        return fake_eps(torch.cat([x] * k), torch.cat([t] * k), context)

    batched = samplers.Denoiser(Recorder()).bind(cond, uncond, 7.5, extra_channels=extra)(x, sigma)
    calls = []
    paired = samplers.Denoiser(lambda x, t, c: calls.append((x, t, c)) or paired_eps(x, t, c), pairs_contexts=True)
    out = paired.bind(cond, uncond, 7.5, extra_channels=extra)(x, sigma)
    assert len(calls) == 1 and calls[0][0].shape == (2, 9, 8, 8) and calls[0][1].shape == (2,)
    assert torch.equal(calls[0][2], torch.cat([uncond, cond])) and torch.equal(calls[0][0][:, 4:], extra)
    torch.testing.assert_close(out, batched, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("uncond, scale", [(None, 7.5), (torch.zeros(2, 3, 5), 1.0)])
def test_denoiser_without_guidance_makes_one_half_size_call(uncond, scale):
    sigma, x, cond = torch.tensor(3.0), start_noise(), torch.ones(2, 3, 5)
    rec = Recorder()
    out = samplers.Denoiser(rec).bind(cond, uncond, scale)(x, sigma)
    assert len(rec.calls) == 1
    x_in, t, ctx = rec.calls[0]
    assert x_in.shape == x.shape and torch.equal(ctx, cond)
    torch.testing.assert_close(x_in, x / 10**0.5)  # c_in = 1 / sqrt(sigma^2 + 1)
    torch.testing.assert_close(out, x - sigma * fake_eps(x_in, t, cond))


def test_denoiser_exact_integer_timesteps_for_table_sigmas():
    table = schedule.discrete_sigmas()
    den = samplers.Denoiser(toy_eps, interpolation="linear")
    assert torch.equal(den.sigma_to_t(table), torch.arange(1000, dtype=torch.float32))
    rec = Recorder()
    model = samplers.Denoiser(rec).bind(torch.zeros(2, 1, 1))
    for sigma in samplers.get_sigmas("plms", 7)[:-1]:
        model(start_noise(), sigma)
    assert [c[1][0].item() for c in rec.calls] == schedule.leading_timesteps(7).tolist()
    assert all(c[1].dtype == torch.float32 and c[1].shape == (2,) for c in rec.calls)


def test_denoiser_interpolated_timestep():
    table = schedule.discrete_sigmas()
    sigma = (table[400] * table[401]) ** 0.5  # log-midpoint
    assert abs(samplers.Denoiser(toy_eps).sigma_to_t(sigma).item() - 400.5) < 1e-4
    lin = samplers.Denoiser(toy_eps, interpolation="linear").sigma_to_t((table[400] + table[401]) / 2)
    assert abs(lin.item() - 400.5) < 1e-4
    rounded = samplers.Denoiser(toy_eps, interpolation="log_rounded").sigma_to_t(sigma * 1.0001)
    assert rounded.item() == 401.0


def test_denoiser_extra_channels_follow_c_in_and_cfg():
    x, sigma = start_noise(), torch.tensor(2.0)
    extra = torch.randn(2, 5, 8, 8)
    rec = Recorder()
    model = samplers.Denoiser(rec).bind(torch.ones(2, 3, 5), torch.zeros(2, 3, 5), 5.0, extra_channels=extra)
    model(x, sigma)
    x_in = rec.calls[0][0]
    assert x_in.shape == (4, 9, 8, 8)
    torch.testing.assert_close(x_in[:, :4], torch.cat([x / 5**0.5] * 2))
    assert torch.equal(x_in[:, 4:], torch.cat([extra, extra]))


def test_denoiser_accepts_per_sample_sigma():
    table = schedule.discrete_sigmas()
    sigma = table[[100, 700]]
    rec = Recorder()
    samplers.Denoiser(rec).bind(torch.ones(2, 3, 5))(start_noise(), sigma)
    assert rec.calls[0][1].tolist() == [100.0, 700.0]


# ---------------------------------------------------------------------------------------------
# API behaviour


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_callback_counts_steps(name):
    seen = []
    steps = 4
    sigmas = samplers.get_sigmas(name, steps)
    model = samplers.Denoiser(toy_eps).bind(None)
    x = start_noise() * samplers.initial_noise_scale(name, sigmas)
    out = samplers.SAMPLERS[name](model, x, sigmas, callback=lambda i, n, lat: seen.append((i, n, lat)))
    assert [(i, n) for i, n, _ in seen] == [(k, steps) for k in range(1, steps + 1)]
    assert torch.equal(seen[-1][2], out)


def test_labels_and_names():
    assert set(samplers.SAMPLER_LABELS) == set(samplers.SAMPLERS)
    assert samplers.sampler_label("euler_a") == "Euler a"
    assert samplers.sampler_label("dpmpp_2m", karras=True) == "DPM++ 2M Karras"
    with pytest.raises(InputError, match="plms, ddim, euler, euler_a, heun, dpmpp_2m"):
        samplers.get_sampler("k_lms")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: samplers.get_sigmas("ddim", 10, karras=True), "Karras"),
        (lambda: samplers.get_sigmas("plms", 10, karras=True), "Karras"),
        (lambda: samplers.get_sigmas("euler", 0), "steps"),
        (lambda: samplers.get_sigmas("euler", 1001), "steps"),
        (lambda: samplers.get_sigmas("euler", 2.5), "steps"),
        (lambda: samplers.get_sigmas("dpmpp_2m", 10, spacing="leading"), "spacing"),
        (lambda: samplers.get_sigmas("nope", 10), "unknown sampler"),
        (lambda: samplers.Denoiser(toy_eps, interpolation="cubic"), "interpolation"),
        (lambda: samplers.sample_euler(None, torch.zeros(1), torch.ones(1)), "sigmas"),
        (lambda: samplers.sample_ddim(None, torch.zeros(1), torch.ones(2), eta=-1), "eta"),
        (lambda: samplers.sample_heun(None, torch.zeros(1), torch.ones(2), eta=0.5), "option"),
    ],
)
def test_invalid_inputs_raise_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_to_vp_and_to_ve_round_trip():
    x = start_noise()
    torch.testing.assert_close(samplers.to_ve(samplers.to_vp(x, 3.0), 3.0), x)
    torch.testing.assert_close(samplers.to_vp(x, 3.0), x / 10**0.5)


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) diffusers UNet with classifier-free guidance


@pytest.fixture(scope="module")
def tiny_unet():
    # One thread: these convolutions are tiny, and a second thread only spin-waits when the
    # two cores are busy (10x slower under load). Restored when the module ends.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    yield unet.eval()
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name, karras", [("plms", False), ("euler_a", False), ("dpmpp_2m", False), ("dpmpp_2m", True), ("heun", True)]
)
@torch.no_grad()
def test_tiny_unet_cfg_matches_diffusers(tiny_unet, name, karras):
    steps, scale = 12, 7.5  # 12: fractional linspace timesteps, a leading ratio that does not divide 1000
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 5, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    sched = reference_scheduler(name, **({"use_karras_sigmas": True} if karras else {}))
    sched.set_timesteps(steps)
    step_gen = torch.Generator().manual_seed(11)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x] * 2), t)
        eps_u, eps_c = tiny_unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        extra = {"generator": step_gen} if name == "euler_a" else {}
        x = sched.step(eps, t, x, **extra).prev_sample

    def eps_fn(x_in, t, context):
        return tiny_unet(x_in, t, encoder_hidden_states=context).sample

    table = sched.alphas_cumprod
    sigmas = samplers.get_sigmas(name, steps, karras, alphas_cumprod=table)
    den = samplers.Denoiser(eps_fn, table, interpolation=samplers.timestep_interpolation(name, karras))
    noise_gen = torch.Generator().manual_seed(11)
    start = noise * samplers.initial_noise_scale(name, sigmas)
    lat = samplers.SAMPLERS[name](den.bind(cond, uncond, scale), start, sigmas,
                                  noise_sampler=lambda s, sn: torch.randn(1, 4, 8, 8, generator=noise_gen))
    assert_matches(samplers.to_vp(lat, sigmas[-1]), x, f"tiny UNet CFG {name} karras={karras} {steps} steps")
