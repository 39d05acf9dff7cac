"""Samplers (k-diffusion style pure functions), their sigma schedules and the Denoiser adapter.

Every sampler has one signature::

    sample_xxx(model, x, sigmas, *, callback=None, noise_sampler=None, **options) -> x

- `model(x, sigma) -> denoised`: the x0 prediction, with `x` in k-diffusion's VE scaling
  (x_ve = x_vp / sqrt(alphas_cumprod)) and `sigma` a 0-d or (B,) tensor. Build it with
  `Denoiser(unet_eps_fn, alphas_cumprod).bind(cond, uncond, guidance_scale)`.
- `x`: starting latents at sigmas[0] in VE scaling: `noise * initial_noise_scale(name, sigmas)`.
- `sigmas`: from `get_sigmas(name, steps, karras)`; returns x at sigmas[-1] (VE). Convert with
  `to_vp(x, sigmas[-1])` before decoding (DDIM/PLMS stop at sigma(t=0) ~ 0.029, not at 0).
- `callback(step, total, x)`: after each step, step counted from 1, `x` = the current VE latents;
  a callback that returns a tensor replaces x (used for inpainting's known-region blend).
- `noise_sampler(sigma, sigma_next)`: fresh unit noise for ancestral / eta > 0 steps.

Model evaluations only happen at the schedule's own sigmas, so the Denoiser can give the UNet
exactly the timestep each reference gives it; `timestep_interpolation(name, karras)` names the
rule (see schedule.sigma_to_t).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from . import schedule
from .errors import InputError
from .schedule import to_ve, to_vp  # noqa: F401  (re-exported for the pipeline)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EPSILON_FAMILY = ("euler", "euler_a", "heun")
DISCRETE = ("plms", "ddim")


class Denoiser:
    """Adapts an eps-predicting UNet `eps_fn(x_vp, t, context)` to k-diffusion's `model(x, sigma)`.

    `t` reaches eps_fn as a float32 tensor on x's device, one per latent it gets: the exact
    integer for a sigma of the training table, otherwise interpolated by `interpolation`
    ("log" k-diffusion, "linear" or "log_rounded": see timestep_interpolation).
    With guidance in one call (`cfg_batch`), `pairs_contexts=True` passes the latents once with
    [uncond, cond] (for an eps_fn that pairs each latent with each context, as UNetModel does);
    otherwise the latents are repeated to the 2B batch.
    """

    def __init__(self, eps_fn, alphas_cumprod: torch.Tensor | None = None, *,
                 interpolation: str = "log", cfg_batch: bool = True, pairs_contexts: bool = False):
        if interpolation not in schedule.INTERPOLATIONS:
            raise InputError(f"unknown timestep interpolation {interpolation!r}; "
                             f"use one of {', '.join(schedule.INTERPOLATIONS)}")
        self.eps_fn = eps_fn
        self.sigmas = schedule.discrete_sigmas(alphas_cumprod)  # (T,) ascending in t, CPU float32
        self.interpolation = interpolation
        self.cfg_batch = cfg_batch  # False: the uncond and cond halves run as two calls
        # True: eps_fn takes a context batch that is a multiple of the latents' (unet.UNetModel
        # does), so the batched guidance call passes the latents once with [uncond, cond]
        self.pairs_contexts = pairs_contexts

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """UNet timestep for each sigma: exact integers for table sigmas, else interpolated."""
        return schedule.sigma_to_t(sigma, self.sigmas, self.interpolation).to(torch.float32)

    def __call__(self, x, sigma, *, cond, uncond=None, guidance_scale=1.0, extra_channels=None):
        """x0 prediction for VE latents `x` at noise level `sigma`, with classifier-free guidance."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = self.sigma_to_t(sigma).to(x.device)
        s = sigma.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        x_in = x / (s**2 + 1) ** 0.5  # c_in: back to VP scaling, the UNet's training input
        if uncond is None or guidance_scale == 1:
            eps = self._eps(x_in, t, cond, extra_channels)
        else:
            if self.cfg_batch and self.pairs_contexts:
                # One call, each latent with [uncond, cond]: the 2B batch of CompVis and diffusers,
                # without running the context-free first layers twice on equal halves.
                eps_u, eps_c = self._eps(x_in, t, torch.cat([uncond, cond]), extra_channels).chunk(2)
            elif self.cfg_batch:
                # One 2B batch, [uncond, cond] in that order like CompVis and diffusers.
                extra = None if extra_channels is None else torch.cat([extra_channels] * 2)
                eps_u, eps_c = self._eps(torch.cat([x_in] * 2), torch.cat([t] * 2),
                                         torch.cat([uncond, cond]), extra).chunk(2)
            else:
                # Two B-sized calls: half the activation memory (memory="low"), the same
                # arithmetic per image up to the last bits of batched matrix products.
                eps_u = self._eps(x_in, t, uncond, extra_channels)
                eps_c = self._eps(x_in, t, cond, extra_channels)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        return x - s * eps

    def _eps(self, x_in, t, context, extra_channels):
        if extra_channels is not None:
            # The 9-channel inpainting UNet takes [latents, mask, masked-image latents]; the extra
            # channels are already in the UNet's scaling, so they are appended after c_in.
            x_in = torch.cat([x_in, extra_channels.to(x_in.dtype)], dim=1)
        return self.eps_fn(x_in, t, context)

    def bind(self, cond, uncond=None, guidance_scale=1.0, extra_channels=None) -> Model:
        """`model(x, sigma)` with the conditioning fixed, as the samplers expect."""
        return functools.partial(self, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                                 extra_channels=extra_channels)


# ---------------------------------------------------------------------------------------------
# Samplers. All work in VE scaling, where one DDIM step is one Euler step in sigma.


def sample_euler(model, x, sigmas, *, callback=None, noise_sampler=None, **options):
    """Euler method (Karras et al. 2022, Algorithm 2 without churn; k-diffusion sample_euler)."""
    _no_options("euler", options)
    total = _check_sigmas(sigmas)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma)) / sigma
        x = x + d * (sigma_next - sigma)
        x = _report(callback, i, total, x)
    return x


def sample_euler_a(model, x, sigmas, *, callback=None, noise_sampler=None, eta=1.0, **options):
    """Euler ancestral (k-diffusion sample_euler_ancestral): Euler to sigma_down, then fresh noise."""
    _no_options("euler_a", options)
    total = _check_sigmas(sigmas)
    eta = _check_eta(eta, None)
    noise_sampler = noise_sampler or _default_noise(x)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
        x = _report(callback, i, total, x)
    return x


def sample_heun(model, x, sigmas, *, callback=None, noise_sampler=None, **options):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1 without churn; k-diffusion sample_heun)."""
    _no_options("heun", options)
    total = _check_sigmas(sigmas)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - model(x, sigma)) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt  # the correction would divide by sigma = 0: plain Euler to the end
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        x = _report(callback, i, total, x)
    return x


def sample_dpmpp_2m(model, x, sigmas, *, callback=None, noise_sampler=None, **options):
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion sample_dpmpp_2m), multistep in log-sigma."""
    _no_options("dpmpp_2m", options)
    total = _check_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised  # the exponential step's limit; both references also drop to 1st order here
        else:
            h = sigma.log() - sigma_next.log()  # step in lambda = -log(sigma)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = _report(callback, i, total, x)
    return x


def sample_ddim(model, x, sigmas, *, callback=None, noise_sampler=None, eta=0.0, **options):
    """DDIM (Song et al. 2021) exactly as CompVis DDIMSampler, eta 0 = deterministic."""
    # CompVis' VP step sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, with
    # s = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)), divided by sqrt(a_prev) to VE, is
    # x0 + sigma_down eps + sigma_up z where sigma_up = s / sqrt(a_prev)
    # = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2): exactly k-diffusion's ancestral split.
    _no_options("ddim", options)
    total = _check_sigmas(sigmas)
    eta = _check_eta(eta, 1.0)
    noise_sampler = noise_sampler or _default_noise(x)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if eta > 0 and sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
        x = _report(callback, i, total, x)
    return x


def sample_plms(model, x, sigmas, *, callback=None, noise_sampler=None, **options):
    """PLMS (Liu et al. 2022, pseudo linear multistep) exactly as CompVis PLMSSampler."""
    # A DDIM step with eps e is x + (sigma_next - sigma) * e in VE scaling; PLMS replaces e by an
    # Adams-Bashforth combination of the raw eps of the previous steps (orders 2, 3, 4) and
    # starts with one pseudo improved Euler step that costs a second model call.
    _no_options("plms", options)
    total = _check_sigmas(sigmas)
    old_eps = []
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = _eps(model, x, sigma)
        if not old_eps:
            eps_prime = (eps + _plms_lookahead(model, x, eps, sigmas)) / 2
        else:
            eps_prime = _adams_bashforth(eps, old_eps)
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = (old_eps + [eps])[-3:]
        x = _report(callback, i, total, x)
    return x


def _plms_lookahead(model, x, eps, sigmas):
    # eps at the DDIM-predicted next point, evaluated at the *next timestep* of the schedule.
    # CompVis clamps that index, so with a single step it re-uses the same timestep (sigmas[0])
    # while the latents are at sigmas[1]; re-express those VP latents at the evaluated sigma.
    # (diffusers' PNDM skips this second call when there is only one step.)
    sigma, sigma_next = sigmas[0], sigmas[1]
    x_next = x + (sigma_next - sigma) * eps
    if len(sigmas) > 2:
        return _eps(model, x_next, sigma_next)
    return _eps(model, to_ve(to_vp(x_next, sigma_next), sigma), sigma)


def _adams_bashforth(eps, old):
    # Coefficients of the explicit Adams-Bashforth methods of order 2, 3 and 4 (old[-1] newest).
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def _eps(model, x, sigma):
    return (x - model(x, sigma)) / sigma


def _ancestral_step(sigma, sigma_next, eta):
    # Split sigma_next into a deterministic part (sigma_down) and fresh noise (sigma_up) such
    # that sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step).
    if eta == 0:
        return sigma_next, sigma_next * 0
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    up = torch.minimum(up, sigma_next)
    return (sigma_next**2 - up**2) ** 0.5, up


def _check_eta(eta, upper):
    is_number = isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta)
    if not is_number or eta < 0 or (upper is not None and eta > upper):
        # past eta = 1, CompVis' DDIM can take the square root of a negative number
        bound = f"between 0 and {upper}" if upper is not None else ">= 0"
        raise InputError(f"eta must be a number {bound}, got {eta!r}")
    return float(eta)


def _check_sigmas(sigmas) -> int:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise InputError("sigmas must be a 1-D tensor with at least 2 entries (start and end)")
    return len(sigmas) - 1


def _no_options(name, options):
    if options:
        raise InputError(f"sampler {name!r} does not take option(s) {', '.join(sorted(options))}")


def _default_noise(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


def _report(callback, i, total, x):
    # A callback may return replacement latents: inpainting with an ordinary checkpoint puts the
    # known region back after every step, as diffusers' pipeline does.
    if callback is not None:
        out = callback(i + 1, total, x)
        if out is not None:
            return out
    return x


# ---------------------------------------------------------------------------------------------
# The sampler table and the schedule each sampler gets.

SAMPLERS = {
    "plms": sample_plms,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}

# A1111 names, written to PNG metadata ("Sampler: DPM++ 2M Karras").
SAMPLER_LABELS = {
    "plms": "PLMS",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
}


def get_sampler(name: str):
    """The sampler function for a name from SAMPLERS."""
    _check_name(name)
    return SAMPLERS[name]


def sampler_label(name: str, karras: bool = False) -> str:
    """A1111's label for the sampler, with " Karras" for the Karras schedule."""
    _check_name(name)
    return SAMPLER_LABELS[name] + (" Karras" if karras else "")


def get_sigmas(name: str, steps: int, karras: bool = False, *, spacing: str | None = None,
               alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """The sigma schedule (steps + 1 entries, float32, CPU) that the references use for `name`.

    - plms, ddim: sigmas at the "leading" timesteps (CompVis), ending at sigma(t=0).
    - euler, euler_a, heun: diffusers' default "linspace" fractional timesteps with sigma
      interpolated linearly, or spacing="leading" (integer timesteps); Karras between that
      schedule's end points. Then 0.
    - dpmpp_2m: diffusers DPMSolverMultistep's integer timesteps, or Karras over the whole table.
    """
    _check_name(name)
    schedule.check_steps(steps)
    table = schedule.discrete_sigmas(alphas_cumprod)
    spacing = _check_spacing(name, spacing, karras)
    if name in DISCRETE:
        return schedule.ddim_sigmas(steps, alphas_cumprod)
    if name == "dpmpp_2m":
        if karras:
            return schedule.append_zero(schedule.karras_sigmas(steps, table[0], table[-1]))
        return schedule.append_zero(table[schedule.dpm_solver_timesteps(steps)])
    if spacing == "leading":
        base = table[schedule.leading_timesteps(steps)]
    else:
        base = schedule.sigmas_at(schedule.linspace_timesteps(steps), table, "linear")
    if karras:
        # diffusers takes the Karras end points from the spaced schedule, not from the table
        # (the same thing for "linspace": sigma(999) and sigma(0)).
        base = schedule.karras_sigmas(steps, base[-1], base[0])
    return schedule.append_zero(base)


def initial_noise_scale(name: str, sigmas: torch.Tensor, *, spacing: str | None = None) -> torch.Tensor:
    """Factor for unit noise to become the VE starting latents at sigmas[0] (x_T = noise * scale)."""
    # k-diffusion and diffusers' Euler family with "linspace" start from noise * sigma_max.
    # CompVis DDIM/PLMS and diffusers' DPMSolverMultistep start from unit *VP* noise, which in VE
    # scaling is noise * sqrt(sigma_max^2 + 1); so does diffusers' Euler family with "leading"
    # spacing (its init_noise_sigma). A1111 uses sigma_max for DPM++ 2M (0.2 % smaller x_T).
    _check_name(name)
    spacing = _check_spacing(name, spacing, False)
    sigma = sigmas[0].to(torch.float32)
    if name in EPSILON_FAMILY and spacing == "linspace":
        return sigma
    return (sigma**2 + 1) ** 0.5


def timestep_interpolation(name: str, karras: bool = False, *, spacing: str | None = None) -> str:
    """The Denoiser interpolation that gives the UNet the reference's timestep for this schedule."""
    _check_name(name)
    spacing = _check_spacing(name, spacing, karras)
    if name == "dpmpp_2m" and karras:
        return "log_rounded"  # diffusers rounds DPM-Solver's Karras timesteps to integers
    if name in EPSILON_FAMILY and spacing == "linspace" and not karras:
        return "linear"
    return "log"  # Karras (both references) and table sigmas (snapped to integers anyway)


def _check_name(name):
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _check_spacing(name, spacing, karras):
    if name in DISCRETE:
        if karras:
            raise InputError(f"sampler {name!r} runs on the model's discrete timesteps; "
                             "the Karras schedule needs euler, euler_a, heun or dpmpp_2m")
        allowed = ("leading",)
    else:
        allowed = ("linspace", "leading") if name in EPSILON_FAMILY else ("linspace",)
    spacing = allowed[0] if spacing is None else spacing
    if spacing not in allowed:
        raise InputError(f"sampler {name!r} supports timestep spacing {' or '.join(allowed)}, "
                         f"got {spacing!r}")
    return spacing
