"""The conformance suite every sampler passes, built in or your own (bench/samplers/):

    check_sampler("dpmpp2m[order=1]")     # one spec
    check_all_samplers()                  # every registered sampler and its variants

A sampler is run on a closed-form model (a Gaussian mixture's exact noise or velocity prediction,
float64) over the noise tables of its model family (for epsilon samplers the DDIMScheduler
configurations users have: default linear betas with set_alpha_to_one false and true, spacing
leading, trailing and linspace, steps_offset 0 and 1, Stable Diffusion's and a cosine table; for
flow samplers two training lengths) and step counts N in STEPS, as diffusers' scheduler tests run
one check over many configurations. It checks:

- declaration: options declared and validated, a summary, a diffusers scheduler class, a model
  output type, eta > 0 refused by a deterministic sampler, N = 0 and N > T refused;
- trajectory: N steps of the schedule equal the diffusers scheduler's own `step` loop
  (`sampler.scheduler(config)`, its tables read in float64), model times equal its timesteps; with
  injected noise too for a stochastic sampler (the same noise handed to `step`);
- linear weights: `state_weight` and `output_weight(i)` equal autograd through the step rule
  (every model output a free leaf), and x_0 is W_x x_N + sum_i W_i out_i with no constant; a
  failure says whether the steps land beside the schedule's own grid points (a one-point data
  distribution, whose model output is constant, is then not sampled exactly);
- ODE grid: `ode_grid(0)` and `ode_grid(N)` are the sampler's own points (non-decreasing, ties only
  at identity steps), `ode_grid(M)` has M + 1 strictly increasing finite points with the same end
  points and no interval of rounding width;
- model times: every grid point's model time (the sampler's and the ODE grid's) within the
  training range, the ODE's time at the sampler's points equal to its model times;
- identity steps: `is_identity(i)` exactly where the output weight is 0, `effective_steps()` the
  others, an identity step passing the state unchanged and injecting no noise;
- purity: a step recomputed from a saved state alone (out of order, twice) gives the same state
  and changes none of its inputs, and two builds of one schedule run the same trajectory;
- refusals: a configuration the sampler cannot reproduce (clipping, thresholding, other
  parameterisations, other sigma tables) is refused with a SpecError, or else reproduced."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench.chain import Chain, alpha_bar_at_time
from bench.check import Check, Failed, require, run_check, torch_threads
from bench.errors import SpecError, exception_text
from bench.options import Option, format_value, parse_spec

STEPS = (1, 4, 10, 25)
GRID_POINTS = (1, 2, 3, 5, 20, 64)  # M of ode_grid(M)
TRAJECTORY_TOLERANCE = 1e-6  # relative, float64 in; diffusers rounds DPM-Solver and flow states to float32
WEIGHT_TOLERANCE = 1e-10  # relative to the largest weight
TIME_TOLERANCE = 1e-3  # model-time units: the schedule's times against the scheduler's timesteps
# an ODE-grid interval must exceed this fraction of its larger end's magnitude: wider than any
# rounding (an ulp is 2.2e-16 of it), where a fraction of the span would call a real fixed end
# interval rounding on tables whose rho_N is huge (a cosine table's, 2e4, beside a first one of 6e-3)
ROUNDING_WIDTH = 1e-9
ETA = 0.8  # injected noise for stochastic samplers
BATCH, DIM = 6, 3
SAMPLER_CHECKS = (
    "declaration",
    "trajectory = the diffusers step loop",
    "trajectory with injected noise",
    "linear weights = autograd",
    "ODE grid",
    "model times in the training range",
    "identity steps",
    "pure steps",
    "unsupported configurations refused",
)
REFERENCE_TABLES = ("alphas_cumprod", "final_alpha_cumprod", "sigmas")  # read in float64 from the scheduler

_LINEAR = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    clip_sample=False,
    prediction_type="epsilon",
)
_SCALED = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type="epsilon",
)


def _vp_tables() -> dict[str, dict[str, Any]]:
    """DDIMScheduler configurations: diffusers' default betas with every spacing (steps_offset only
    moves leading grids) and both set_alpha_to_one, SD 1.x's (trailing, and its pipeline's leading
    with offset 1), and a cosine table."""
    tables = {}
    for alpha_to_one in (False, True):
        for spacing, offsets in (("leading", (0, 1)), ("trailing", (0,)), ("linspace", (0,))):
            for offset in offsets:
                tables[
                    f"linear {spacing}"
                    + (f" offset={offset}" if spacing == "leading" else "")
                    + f" alpha_to_one={format_value(alpha_to_one)}"
                ] = dict(_LINEAR, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_to_one)
    tables["sd trailing"] = dict(_SCALED, timestep_spacing="trailing", set_alpha_to_one=False)
    tables["sd leading offset=1"] = dict(_SCALED, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    tables["cosine leading offset=1"] = dict(
        _LINEAR, beta_schedule="squaredcos_cap_v2", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True
    )
    return tables


TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "epsilon": _vp_tables(),
    "flow": {"flow T=1000": dict(num_train_timesteps=1000), "flow T=200": dict(num_train_timesteps=200)},
}

# Configurations a sampler must refuse (SpecError) or reproduce: nonlinear steps (clipping,
# thresholding), other parameterisations, other sigma tables. Keys the scheduler class does not
# take are left out for that sampler.
UNSUPPORTED: dict[str, dict[str, dict[str, Any]]] = {
    "epsilon": {
        "clip_sample": dict(clip_sample=True, clip_sample_range=0.5),
        "thresholding": dict(thresholding=True, sample_max_value=0.5),
        "v_prediction": dict(prediction_type="v_prediction"),
        "sample prediction": dict(prediction_type="sample"),
        "karras sigmas": dict(use_karras_sigmas=True),
        "lu lambdas": dict(use_lu_lambdas=True),
        "final sigma_min": dict(final_sigmas_type="sigma_min"),
        "euler at final": dict(euler_at_final=True),
    },
    "flow": {
        "karras sigmas": dict(use_karras_sigmas=True),
        "shift_terminal": dict(shift_terminal=0.1),
        "stochastic sampling": dict(stochastic_sampling=True),
        "invert sigmas": dict(invert_sigmas=True),
    },
}
UNSUPPORTED_BASE = {"epsilon": "sd trailing", "flow": "flow T=1000"}
UNSUPPORTED_STEPS = (4, 10)

# Variants checked besides a sampler's defaults: a class's own `variants` (option strings), else
# every non-default choice and flipped bool of its options, plus these for options without choices.
EXTRA_VARIANTS: dict[str, tuple[str, ...]] = {"flow-euler": ("shift=3",)}


class MixtureModel(nn.Module):
    """The exact model output for a two-component Gaussian mixture in DIM dimensions: epsilon on a
    variance-preserving table abar(t) (interpolated in log), or the velocity noise - x_0 of
    x_s = (1 - s) x_0 + s noise at s = t / T (flow). Nonlinear in x, so multistep histories matter."""

    def __init__(self, prediction: str, train_timesteps: int, alpha_bar: Tensor | None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.means = torch.randn(2, DIM, generator=generator, dtype=torch.float64) * 1.5
        self.log_w = torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64))
        self.std, self.prediction, self.train_timesteps = 0.4, prediction, train_timesteps
        self.alpha_bar = alpha_bar

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.prediction == "flow":
            sigma = (t.to(torch.float64) / self.train_timesteps)[:, None, None]
            alpha = 1 - sigma
        else:
            abar = alpha_bar_at_time(t.to(torch.float64), self.alpha_bar)[:, None, None]
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        var = alpha**2 * self.std**2 + sigma**2  # (B, 1, 1)
        diff = x.to(torch.float64)[:, None, :] - alpha * self.means  # (B, K, d)
        log_p = self.log_w - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * DIM * torch.log(var[..., 0])
        gamma = torch.softmax(log_p, dim=-1)[..., None]
        eps = (gamma * sigma * diff / var).sum(1)  # E[noise | x]
        if self.prediction != "flow":
            return eps.to(x.dtype)
        x0 = (gamma * (self.means + alpha * self.std**2 * diff / var)).sum(1)  # E[x_0 | x]
        return (eps - x0).to(x.dtype)


class ReferenceFailed(Failed):
    """The diffusers scheduler itself could not run the case."""


def _rel(a: Tensor, b: Tensor) -> float:
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def _describe(cases: list[str], limit: int = 3) -> str:
    return ", ".join(cases[:limit]) + (f" (+{len(cases) - limit} more)" if len(cases) > limit else "")


class SamplerSuite:
    def __init__(self, spec: str, steps: tuple[int, ...] = STEPS, tables: list[str] | None = None) -> None:
        from bench.samplers import SAMPLERS

        self.spec = spec
        self.cls = SAMPLERS.get(parse_spec(spec)[0])
        self.steps = steps
        self.checks: list[Check] = []
        self.tables: dict[str, dict[str, Any]] = {}
        family = TABLES.get(self.cls.prediction, {})
        seen = set()
        for name, config in family.items():  # one row per configuration the scheduler tells apart
            if tables is not None and name not in tables:
                continue
            try:
                key = json.dumps(dict(self.sampler().scheduler(config).config), sort_keys=True, default=str)
            except Exception:
                key = name  # a scheduler that fails to build: the trajectory check says so
            if key not in seen:
                seen.add(key)
                self.tables[name] = config
        self._models: dict[str, MixtureModel] = {}
        self._schedules: dict[tuple, Any] = {}

    def sampler(self):
        from bench.samplers import SAMPLERS

        return SAMPLERS.create(self.spec)

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        run_check(self.checks, self.spec, name, fn)

    # -- helpers ------------------------------------------------------------------------------
    def _cases(self) -> list[tuple[str, dict[str, Any], int]]:
        require(
            bool(self.tables),
            f"no noise tables for a model with {self.cls.prediction!r} output "
            f"(the suite has them for {', '.join(TABLES)})",
        )
        return [
            (name, config, n)
            for name, config in self.tables.items()
            for n in self.steps
            if n <= config.get("num_train_timesteps", 1000)
        ]

    def model(self, name: str, config: dict[str, Any]) -> MixtureModel:
        if name not in self._models:
            import diffusers

            table = None
            if self.cls.prediction != "flow":  # the model's own noise table: the config's betas
                accepted = inspect.signature(diffusers.DDIMScheduler.__init__).parameters
                table = diffusers.DDIMScheduler(
                    **{k: v for k, v in config.items() if k in accepted}
                ).alphas_cumprod.double()
            self._models[name] = MixtureModel(self.cls.prediction, config.get("num_train_timesteps", 1000), table)
        return self._models[name]

    def schedule(self, name: str, steps: int, eta: float = 0.0):
        """The sampler's schedule for a table (built once per suite; the purity check builds again)."""
        key = (name, steps, eta)
        if key not in self._schedules:
            self._schedules[key] = self.sampler().schedule(self.tables[name], steps, eta)
        return self._schedules[key]

    def _inputs(self, steps: int, eta: float) -> tuple[Tensor, list[Tensor] | None]:
        generator = torch.Generator().manual_seed(1000 + steps)
        x_start = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
        noises = (
            [torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64) for _ in range(steps)]
            if eta > 0
            else None
        )
        return x_start, noises

    def _against_diffusers(self, name: str, config: dict[str, Any], steps: int, eta: float = 0.0) -> float:
        """Relative distance of the schedule's N-step sample to the scheduler's own `step` loop."""
        sampler, model = self.sampler(), self.model(name, config)
        schedule = self.schedule(name, steps, eta) if name in self.tables else sampler.schedule(config, steps, eta)
        require(schedule.num_steps == steps, f"{name}, N={steps}: the schedule has {schedule.num_steps} steps")
        x_start, noises = self._inputs(steps, eta)
        ours = Chain(model, schedule).sample(x_start, None, noises)
        reference = sampler.scheduler(config)
        reference.set_timesteps(steps)
        for table in REFERENCE_TABLES:  # the same numbers, in float64: diffusers' float32 arithmetic
            value = getattr(reference, table, None)  # loses 3e-6 where abar_N ~ 4e-5 divides
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(reference, table, value.double())
        timesteps = list(reference.timesteps)
        require(len(timesteps) == steps, f"{name}, N={steps}: the scheduler made {len(timesteps)} timesteps")
        x = x_start.clone()
        for k, t in enumerate(timesteps):
            i = steps - k
            ours_t = schedule.model_time(i)
            require(
                abs(ours_t - float(t)) <= TIME_TOLERANCE,
                f"{name}, N={steps}: model time {ours_t:g} at grid point {i}, the scheduler's timestep {float(t):g}",
            )
            out = model(x, torch.full((BATCH,), float(t), dtype=torch.float64))
            extra = dict(eta=eta, variance_noise=noises[i - 1][..., None]) if eta > 0 else {}
            try:  # (B, d, 1): a trailing axis, as the thresholding's per-sample reshape needs
                x = reference.step(out[..., None], t, x[..., None], **extra).prev_sample[..., 0].to(torch.float64)
            except Exception as exc:
                raise ReferenceFailed(
                    f"{self.cls.scheduler_class}.step failed: {type(exc).__name__}: {exception_text(exc)}"
                ) from None
        require(bool(torch.isfinite(ours).all()), f"{name}, N={steps}: non-finite samples")
        return _rel(ours, x)

    def _step_rule(self, schedule, x_start: Tensor, outs: list[Tensor], noises: list[Tensor] | None) -> Tensor:
        n = schedule.num_steps
        state = schedule.start(x_start)
        for i in range(n, 0, -1):
            state = schedule.advance(state, i, outs[n - i], None if noises is None else noises[i - 1])
        return state[0]

    def _on_grid(self, schedule) -> float:
        """Largest relative miss of the step rule on a one-point data distribution: from
        x_N = alpha_N x0 + sigma_N n with the exact (constant) model output, every step of a
        consistent sampler lands on alpha_{i-1} x0 + sigma_{i-1} n."""
        n = schedule.num_steps
        generator = torch.Generator().manual_seed(7)
        x0, noise = (torch.randn(DIM, generator=generator, dtype=torch.float64) for _ in range(2))
        out = noise - x0 if self.cls.prediction == "flow" else noise
        state = schedule.start(schedule.alpha(n) * x0 + schedule.sigma(n) * noise)
        worst = 0.0
        for i in range(n, 0, -1):
            state = schedule.advance(state, i, out.clone(), torch.zeros(DIM, dtype=torch.float64))
            expected = schedule.alpha(i - 1) * x0 + schedule.sigma(i - 1) * noise
            worst = max(worst, _rel(state[0], expected))
        return worst

    def _train_range(self, config: dict[str, Any]) -> tuple[float, float]:
        train = config.get("num_train_timesteps", 1000)
        return (0.0, float(train)) if self.cls.prediction == "flow" else (0.0, float(train - 1))

    # -- the checks ---------------------------------------------------------------------------
    def declaration(self) -> str:
        import diffusers

        from bench.samplers import PREDICTIONS, SAMPLERS

        cls = self.cls
        names = [opt.name for opt in cls.options]
        require(len(set(names)) == len(names), f"duplicate option names {names}")
        for opt in cls.options:
            require(isinstance(opt, Option), f"{opt!r} is not a bench.options.Option")
            require(opt.type in (int, float, bool, str), f"option {opt.name}: type {opt.type} unsupported")
            require(bool(opt.help), f"option {opt.name} has no help text")
            opt.parse(opt.default, cls.name)
        try:
            SAMPLERS.create(f"{cls.name}[no_such_option=1]")
            raise Failed("an unknown option was accepted")
        except SpecError:
            pass
        require(bool(cls.summary), "no summary (shown by `python -m bench list`)")
        require(cls.prediction in PREDICTIONS, f"prediction {cls.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        require(
            isinstance(getattr(diffusers, cls.scheduler_class or "-", None), type),
            f"scheduler_class {cls.scheduler_class!r} is not a diffusers scheduler class",
        )
        require(bool(self.tables), f"no noise tables for a model with {cls.prediction!r} output")
        name, config = next(iter(self.tables.items()))
        if cls.stochastic:
            self.sampler().schedule(config, 4, ETA)
        else:
            try:
                self.sampler().schedule(config, 4, ETA)
                raise Failed(f"deterministic (stochastic = False), but eta={ETA} was accepted")
            except SpecError:
                pass
        for steps in (0, config.get("num_train_timesteps", 1000) + 1):
            try:
                self.sampler().schedule(config, steps)
                raise Failed(f"N = {steps} steps was accepted (on {name})")
            except SpecError:
                pass
        return f"{len(names)} option(s): {', '.join(names) or 'none'}; {cls.prediction} model; {cls.scheduler_class}"

    def _over_cases(
        self,
        check: Callable[[str, dict[str, Any], int, float], Any],
        etas: tuple[float, ...] = (0.0,),
        skip_one_step: bool = False,
    ) -> list[Any]:
        """`check(name, config, N, eta)` on every case; Failed with every failing case's message."""
        results, failures = [], []
        for name, config, steps in self._cases():
            for eta in etas:
                if skip_one_step and steps == 1:
                    continue
                try:
                    results.append(check(name, config, steps, eta))
                except Failed as exc:
                    failures.append(str(exc))
        if failures:
            total = len(failures) + len(results)
            raise Failed(
                f"fails on {len(failures)} of {total} cases: "
                + "; ".join(failures[:3])
                + (f"; ... (+{len(failures) - 3} more)" if len(failures) > 3 else "")
            )
        return results

    @staticmethod
    def _where(name: str, steps: int, eta: float = 0.0) -> str:
        return f"{name}, N={steps}" + (f", eta={eta:g}" if eta else "")

    def _etas(self) -> tuple[float, ...]:
        return (0.0, ETA) if self.cls.stochastic else (0.0,)

    def trajectory(self) -> str:
        def check(name, config, steps, eta):
            err = self._against_diffusers(name, config, steps)
            require(
                err < TRAJECTORY_TOLERANCE,
                f"{self._where(name, steps)}: rel. distance {err:.2e} to "
                f"{self.cls.scheduler_class}.step (tolerance {TRAJECTORY_TOLERANCE:g})",
            )
            return err, self._where(name, steps)

        worst, where = max(self._over_cases(check))
        return (
            f"{len(self.tables)} table(s) x N in {{{', '.join(map(str, self.steps))}}}: largest rel. distance "
            f"{worst:.1e} ({where}; tolerance {TRAJECTORY_TOLERANCE:g})"
        )

    def stochastic_trajectory(self):
        if not self.cls.stochastic:
            return "n/a", "deterministic sampler"

        def check(name, config, steps, eta):
            err = self._against_diffusers(name, config, steps, ETA)
            require(
                err < TRAJECTORY_TOLERANCE,
                f"{self._where(name, steps, ETA)}: rel. distance {err:.2e} to "
                f"{self.cls.scheduler_class}.step with the same noise (tolerance {TRAJECTORY_TOLERANCE:g})",
            )
            return err

        worst = max(self._over_cases(check, skip_one_step=True))
        return f"eta={ETA:g}, the same noise: largest rel. distance {worst:.1e} (tolerance {TRAJECTORY_TOLERANCE:g})"

    def weights(self) -> str:
        def check(name, config, steps, eta):
            schedule, where = self.schedule(name, steps, eta), self._where(name, steps, eta)
            generator = torch.Generator().manual_seed(steps)
            x_start = torch.randn(1, generator=generator, dtype=torch.float64).requires_grad_(True)
            outs = [torch.randn(1, generator=generator, dtype=torch.float64).requires_grad_(True) for _ in range(steps)]
            noises = (
                [torch.randn(1, generator=generator, dtype=torch.float64) for _ in range(steps)] if eta > 0 else None
            )
            x0 = self._step_rule(schedule, x_start, outs, noises)
            grads = torch.autograd.grad(x0.sum(), [x_start, *outs], allow_unused=True)
            grads = [0.0 if g is None else float(g) for g in grads]
            claimed = [schedule.state_weight, *(schedule.output_weight(i) for i in range(steps, 0, -1))]
            require(all(math.isfinite(w) for w in claimed), f"{where}: non-finite weights {claimed[:4]}")
            scale = max(max(abs(g) for g in grads), 1e-300)
            err = max(abs(g - w) for g, w in zip(grads, claimed)) / scale
            if err > WEIGHT_TOLERANCE:
                j = max(range(len(grads)), key=lambda k: abs(grads[k] - claimed[k]))
                what = "state_weight" if j == 0 else f"output_weight({steps - j + 1})"
                miss = self._on_grid(self.schedule(name, steps))
                raise Failed(
                    f"{where}: {what} = {claimed[j]:.10g}, autograd through the step rule {grads[j]:.10g} "
                    f"(rel. {err:.1e})"
                    + (
                        f" [the steps land beside the schedule's grid points here: a "
                        f"one-point distribution is missed by {miss:.1e}]"
                        if miss > 1e-9
                        else ""
                    )
                )
            if eta == 0:
                affine = float(claimed[0] * x_start.detach() + sum(w * o.detach() for w, o in zip(claimed[1:], outs)))
                gap = abs(affine - float(x0.detach())) / max(abs(float(x0.detach())), 1e-300)
                require(
                    gap <= WEIGHT_TOLERANCE,
                    f"{where}: x_0 - (W_x x_N + sum W_i out_i) = "
                    f"{float(x0.detach()) - affine:.3g}: a constant term in a deterministic step",
                )
            return err

        errors = self._over_cases(check, self._etas())
        return f"{len(errors)} (table, N, eta): largest rel. error {max(errors):.1e} (tolerance {WEIGHT_TOLERANCE:g})"

    def ode_grid(self) -> str:
        def check(name, config, steps, eta):
            schedule, where = self.schedule(name, steps), self._where(name, steps)
            own = [schedule.ode_point(i) for i in range(steps + 1)]
            require(all(math.isfinite(s) for s in own), f"{where}: non-finite ODE points {own[:3]}...{own[-2:]}")
            require(list(schedule.ode_grid(0)) == own, f"{where}: ode_grid(0) is not the sampler's own points")
            require(list(schedule.ode_grid(steps)) == own, f"{where}: ode_grid(N) is not the sampler's own points")
            for i in range(1, steps + 1):
                require(own[i] >= own[i - 1], f"{where}: own points decrease at {i}: {own[i - 1]:.6g} > {own[i]:.6g}")
                if own[i] == own[i - 1]:
                    require(
                        schedule.is_identity(i),
                        f"{where}: grid points {i - 1} and {i} coincide "
                        f"(s = {own[i]:.6g}) but step {i} is not an identity step",
                    )
            span = own[-1] - own[0]
            if span == 0:  # e.g. DDIM's leading grid at N = 1: its one step lands where it starts
                require(
                    all(schedule.is_identity(i) for i in range(1, steps + 1)),
                    f"{where}: the grid spans nothing ({own[0]:.6g}) but not every step is an identity step",
                )
                return None, where
            smallest = math.inf
            for m in GRID_POINTS:
                if m == steps:
                    continue
                grid = list(schedule.ode_grid(m))
                require(len(grid) == m + 1, f"{where}: ode_grid({m}) has {len(grid)} points, expected {m + 1}")
                require(all(math.isfinite(s) for s in grid), f"{where}: ode_grid({m}) has non-finite points")
                require(
                    abs(grid[0] - own[0]) <= 1e-12 * span and abs(grid[-1] - own[-1]) <= 1e-12 * span,
                    f"{where}: ode_grid({m}) runs {grid[0]:.12g}..{grid[-1]:.12g}, the sampler's points "
                    f"{own[0]:.12g}..{own[-1]:.12g}",
                )
                gaps = [b - a for a, b in zip(grid, grid[1:])]
                widths = [gap - ROUNDING_WIDTH * max(abs(a), abs(b)) for gap, a, b in zip(gaps, grid, grid[1:])]
                require(
                    min(widths) > 0,
                    f"{where}: ode_grid({m}) = "
                    + (f"[{', '.join(f'{v:.17g}' for v in grid)}]" if m <= 3 else "...")
                    + f" has an interval of {min(gaps):.2e} (span {span:.3g}; "
                    + ("not increasing" if min(gaps) <= 0 else "rounding width")
                    + ")",
                )
                smallest = min(smallest, min(gaps) / span)
            return smallest, where

        results = self._over_cases(check)
        points = [where for smallest, where in results if smallest is None]
        smallest = min((value for value, _ in results if value is not None), default=math.inf)
        return (
            f"{len(results)} (table, N) x M in {{{', '.join(map(str, GRID_POINTS))}}}: end points the sampler's, "
            f"smallest interval {smallest:.1e} of the span"
            + (f"; a single point (identity steps only) at {_describe(points)}" if points else "")
        )

    def model_times(self) -> str:
        def check(name, config, steps, eta):
            schedule, where = self.schedule(name, steps), self._where(name, steps)
            low, high = self._train_range(config)
            worst = 0.0
            for i in range(steps + 1):
                t = schedule.model_time(i)
                require(
                    math.isfinite(t) and low <= t <= high,
                    f"{where}: model time {t:g} at grid point {i}, outside the training range [{low:g}, {high:g}]",
                )
                if i >= 1:
                    at = schedule.ode_time(schedule.ode_point(i))
                    require(
                        abs(at - t) <= TIME_TOLERANCE,
                        f"{where}: the ODE's time at grid point {i} is {at:.6g}, "
                        f"its model time {t:.6g} (tolerance {TIME_TOLERANCE:g})",
                    )
                    worst = max(worst, abs(at - t))
            for m in GRID_POINTS:
                for s in schedule.ode_grid(m):
                    t = schedule.ode_time(s)
                    require(
                        math.isfinite(t) and low - 1e-9 <= t <= high + 1e-9,
                        f"{where}: ode_grid({m}) point s={s:.6g} has model time {t:g}, outside [{low:g}, {high:g}]",
                    )
            return worst

        worst = max(self._over_cases(check))
        return (
            f"every grid point's model time in the training range; the ODE's time at the sampler's points "
            f"within {worst:.1e} of its model times (tolerance {TIME_TOLERANCE:g})"
        )

    def identity_steps(self) -> str:
        def check(name, config, steps, eta):
            schedule, where = self.schedule(name, steps, eta), self._where(name, steps, eta)
            identity = [i for i in range(steps, 0, -1) if schedule.is_identity(i)]
            zero = [i for i in range(steps, 0, -1) if schedule.output_weight(i) == 0.0]
            require(identity == zero, f"{where}: is_identity at {identity}, output weight 0 at {zero}")
            effective = tuple(schedule.effective_steps())
            expected = tuple(i for i in range(steps, 0, -1) if i not in identity)
            require(effective == expected, f"{where}: effective_steps() {effective}, expected {expected}")
            if not identity:
                return None
            # run the trajectory, trying each identity step on its actual state with a random output
            model, (x_start, noises) = self.model(name, config), self._inputs(steps, eta)
            generator = torch.Generator().manual_seed(3)
            state = schedule.start(x_start)
            for i in range(steps, 0, -1):
                noise = None if noises is None else noises[i - 1]
                if i in identity:
                    require(
                        schedule.noise_std(i) == 0.0,
                        f"{where}: identity step {i} injects noise (noise_std {schedule.noise_std(i):g})",
                    )
                    out = torch.randn(state[0].shape, generator=generator, dtype=torch.float64)
                    moved = schedule.advance(state, i, out, noise)
                    require(
                        torch.equal(moved[0], state[0]),
                        f"{where}: identity step {i} changes the state "
                        f"(by {float((moved[0] - state[0]).abs().max()):.2e})",
                    )
                out = model(state[0], torch.full((BATCH,), schedule.model_time(i), dtype=torch.float64))
                state = schedule.advance(state, i, out, noise)
            return f"{where}: {identity}"

        found = [where for where in self._over_cases(check, self._etas()) if where]
        return (
            f"identity steps at {_describe(found)}" if found else "no identity steps on these tables"
        ) + "; is_identity, zero output weights and effective_steps agree"

    def purity(self) -> str:
        name, config = next(iter(self.tables.items())) if self.tables else (None, None)
        require(name is not None, f"no noise tables for a model with {self.cls.prediction!r} output")
        steps = 10
        eta = ETA if self.cls.stochastic else 0.0
        model = self.model(name, config)
        schedule = self.sampler().schedule(config, steps, eta)
        x_start, noises = self._inputs(steps, eta)
        chain = Chain(model, schedule)
        states, outs = [], []
        state = schedule.start(x_start)
        for i in range(steps, 0, -1):
            states.append(tuple(s.clone() for s in state))
            outs.append(chain.eps(state[0], i, None))
            state = schedule.advance(state, i, outs[-1], None if noises is None else noises[i - 1])
        final = state[0]
        for k in list(range(steps - 1, -1, -1)) + [steps // 2]:  # backwards, then one again
            i = steps - k
            saved = tuple(s.clone() for s in states[k])
            out_saved, noise_saved = outs[k].clone(), None if noises is None else noises[i - 1].clone()
            again = schedule.advance(states[k], i, outs[k], None if noises is None else noises[i - 1])
            expected = states[k + 1] if k + 1 < steps else (final,)
            require(
                torch.equal(again[0], expected[0]),
                f"{name}, N={steps}: step {i} recomputed from its saved "
                f"state differs by {float((again[0] - expected[0]).abs().max()):.2e} (hidden state in the step?)",
            )
            require(
                all(torch.equal(a, b) for a, b in zip(states[k], saved))
                and torch.equal(outs[k], out_saved)
                and (noises is None or torch.equal(noises[i - 1], noise_saved)),
                f"{name}, N={steps}: step {i} changed its inputs in place",
            )
        rebuilt = Chain(model, self.sampler().schedule(config, steps, eta)).sample(x_start, None, noises)
        require(
            torch.equal(rebuilt, final),
            f"{name}, N={steps}: a second build of the schedule runs another "
            f"trajectory (by {float((rebuilt - final).abs().max()):.2e})",
        )
        return f"{name}, N={steps}" + (f", eta={eta}" if eta else "") + ": every step recomputed out of order alike"

    def refusals(self):
        import diffusers

        family = self.cls.prediction
        base = TABLES.get(family, {}).get(UNSUPPORTED_BASE.get(family, ""))
        if base is None:
            return "n/a", f"no configurations to refuse for a model with {family!r} output"
        accepted = inspect.signature(getattr(diffusers, self.cls.scheduler_class).__init__).parameters
        refused, reproduced, wrong, unrunnable = [], [], [], []
        for label, change in UNSUPPORTED.get(family, {}).items():
            if not all(key in accepted for key in change):
                continue
            config = {**base, **change}
            if all(
                self.sampler().scheduler(config).config.get(k) == self.sampler().scheduler(base).config.get(k)
                for k in change
            ):
                continue  # the sampler's own settings override it
            if self.sampler().config_problem(config):  # a task's preflight refuses the model with it
                refused.append(label)
                continue
            try:
                self.sampler().schedule(config, UNSUPPORTED_STEPS[0])
            except SpecError:
                refused.append(label)
                continue
            try:
                error = max(
                    self._against_diffusers(f"{UNSUPPORTED_BASE[family]} + {label}", config, steps)
                    for steps in UNSUPPORTED_STEPS
                )
            except ReferenceFailed as exc:
                unrunnable.append(f"{label} ({exc})")
                continue
            except Failed as exc:
                wrong.append(f"{label} ({exc})")
                continue
            if error < TRAJECTORY_TOLERANCE:
                reproduced.append(label)
            else:
                wrong.append(f"{label} (rel. distance {error:.2g})")
        require(
            not wrong,
            f"accepted (no SpecError) but not reproduced, to {self.cls.scheduler_class}.step: "
            f"{'; '.join(wrong)}; refuse them (refused: {', '.join(refused) or 'none'})",
        )
        return f"refused: {', '.join(refused) or 'none'}; reproduced: {', '.join(reproduced) or 'none'}" + (
            f"; diffusers could not run: {'; '.join(unrunnable)}" if unrunnable else ""
        )


def check_sampler(spec: str, steps: tuple[int, ...] = STEPS, tables: list[str] | None = None) -> list[Check]:
    """Every check of the sampler suite on one sampler spec (see the module); `steps` and `tables`
    (names in TABLES) narrow the cases."""
    with torch_threads(1):  # tensors of 18 numbers: a thread pool only waits (12 ms a softmax on a busy machine)
        return _check_sampler(spec, steps, tables)


def _check_sampler(spec: str, steps: tuple[int, ...], tables: list[str] | None) -> list[Check]:
    suite = SamplerSuite(spec, steps, tables)
    for name, fn in zip(
        SAMPLER_CHECKS,
        (
            suite.declaration,
            suite.trajectory,
            suite.stochastic_trajectory,
            suite.weights,
            suite.ode_grid,
            suite.model_times,
            suite.identity_steps,
            suite.purity,
            suite.refusals,
        ),
    ):
        suite.run(name, fn)
    return suite.checks


def sampler_variants(spec: str) -> list[str]:
    """A bare name: the sampler with its defaults and its variants (the class's `variants` if it
    declares them, else each non-default choice and flipped bool of its options and EXTRA_VARIANTS).
    A spec with options: that spec alone."""
    from bench.samplers import SAMPLERS

    name, values = parse_spec(spec)
    cls = SAMPLERS.get(name)
    if values:
        return [spec]
    variants = getattr(cls, "variants", None)
    if variants is None:
        variants = []
        for opt in cls.options:
            if opt.type is bool:
                variants.append(f"{opt.name}={format_value(not opt.default)}")
            elif opt.choices:
                variants += [f"{opt.name}={format_value(c)}" for c in opt.choices if c != opt.default]
        variants += EXTRA_VARIANTS.get(cls.name, ())
    return [cls.name] + [f"{cls.name}[{variant}]" for variant in variants]


def check_all_samplers(specs: list[str] | None = None) -> list[Check]:
    from bench.samplers import SAMPLERS

    specs = [variant for spec in (specs or SAMPLERS.names()) for variant in sampler_variants(spec)]
    for spec in specs:
        SAMPLERS.create(spec)  # a bad name or option is a SpecError before anything runs
    return [check for spec in specs for check in check_sampler(spec)]


def print_sampler_checks(checks: list[Check], console: Any) -> None:
    from bench.check import print_checks

    print_checks(checks, console, f"Sampler conformance (closed-form model, float64, N in {set(STEPS)})", "sampler")
