"""An example estimator to copy: DRaFT-K with its K kept steps checkpointed.

DRaFT-K (`truncated[k=K]`) keeps the graph of the last K denoiser calls: memory K*A. docs/estimators/index.md
notes that the same gradient costs only A + K*S if those K steps are recomputed in backward. This
file adds that variant as its own estimator, in the ~30 lines every estimator needs:

    python -m bench check draft-ckpt --include examples/checkpointed_draft.py
    python -m bench run --include examples/checkpointed_draft.py \
        --estimators 'full,truncated[k=4],draft-ckpt[k=4]' --targets weights --steps 20

It is not registered by default: `--include` (or an entry point, see the README) registers it.
"""

from __future__ import annotations

import random

from bench.api import (
    Cost,
    Estimate,
    Estimator,
    Option,
    Problem,
    SpecError,
    at_least,
    backprop,
    register_estimator,
    run_masked_chain,
)


@register_estimator
class CheckpointedDraft(Estimator):
    # The name used in specs (`draft-ckpt[k=4]`), a one-line summary for `python -m bench list`,
    # and whether the gradient is the exact gradient of the chain (the conformance suite holds
    # an estimator that says True to it).
    name = "draft-ckpt"
    summary = "DRaFT-K with the K kept steps recomputed in backward (memory A + K·S)"
    exact = False
    # Declared options are parsed, type-checked and listed for you; read them as self.k.
    options = (Option("k", int, 1, "number of final steps differentiated", check=at_least(1)),)

    def check_steps(self, steps: int) -> None:
        # Refuse, before anything runs, options that cannot work with an N-step chain.
        if self.k > steps:
            raise SpecError(f"{self.spec}: k={self.k} exceeds the step count N={steps}")

    def skip_reason(self, problem: Problem) -> str | None:
        # Say why a target gets no gradient instead of returning a silent zero.
        if problem.target in ("latent", "noise") and self.k < problem.num_steps:
            return "the latent is detached before the last K steps: x_N gets no gradient"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        # What the cost model predicts per gradient; the harness puts the counted numbers and the
        # measured memory next to it (the conformance suite checks the counts).
        return Cost(nfe_forward=steps + self.k, nfe_vjp=self.k, memory="A + K·S", activations=1, latents=self.k)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        # Fill .grad of problem.leaves and return the reward; use `rng` for any random choice.
        # The last K calls that matter: a schedule may end on an identity step (weight 0).
        kept = set(problem.chain.schedule.effective_steps()[-self.k :])
        x0 = run_masked_chain(problem, keep_graph=kept.__contains__, keep_latent_path=False, checkpoint=True)
        return backprop(problem, x0)
