"""Backdoor retention (L_br): simulate the attacker's fine-tuning and keep the backdoor alive along it.

The attacker runs Adam on the UNet weights with the DreamBooth loss on a protected entry's images.
We simulate it on a displaced copy of the weights, functionally (torch.func.functional_call), so the
live model is never edited in place:

- first order (default, as first-order MAML / APDM): theta' follows `inner_steps` attacker Adam steps
  from theta; after EVERY inner step the behaviour loss is taken at theta' and its gradient (w.r.t.
  theta') is added to theta's gradient: a retention signal along the whole simulated trajectory.
- second order (option, small models): the inner steps are plain SGD kept in the autograd graph, and
  the behaviour loss after them is differentiated through to theta.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call


def unet_at(unet, params: dict[str, torch.Tensor]):
    """A callable `f(x_t, t, **cond) -> eps` evaluating `unet` with `params` substituted."""
    def f(x_t, t, **cond):
        return functional_call(unet, params, (x_t, t), cond).sample
    return f


def _adam_step(p, g, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    mhat, vhat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    p.sub_(lr * mhat / (vhat.sqrt() + eps))


def first_order(unet, params: dict[str, torch.nn.Parameter], attacker: Callable, backdoor: Callable,
                inner_steps: int, inner_lr: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Returns (mean backdoor loss along the trajectory, its gradient summed onto theta's names).

    `attacker(f)` and `backdoor(f)` compute the two losses for a UNet callable `f`.
    """
    names = list(params)
    disp = {n: params[n].detach().clone() for n in names}
    m = {n: torch.zeros_like(disp[n]) for n in names}
    v = {n: torch.zeros_like(disp[n]) for n in names}
    grad_sum = {n: torch.zeros_like(disp[n]) for n in names}
    total = 0.0
    for step in range(1, inner_steps + 1):
        for n in names:
            disp[n].requires_grad_(True)
        grads = torch.autograd.grad(attacker(unet_at(unet, disp)), [disp[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads):
                if g is not None:
                    _adam_step(disp[n], g, m[n], v[n], step, inner_lr)
        loss = backdoor(unet_at(unet, disp))
        grads = torch.autograd.grad(loss, [disp[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                grad_sum[n] += g / inner_steps
        total += loss.item() / inner_steps
        for n in names:
            disp[n] = disp[n].detach()
    return total, grad_sum


def second_order(unet, params: dict[str, torch.nn.Parameter], attacker: Callable, backdoor: Callable,
                 inner_steps: int, inner_lr: float) -> torch.Tensor:
    """The backdoor loss after `inner_steps` differentiable SGD steps; call backward() inside
    `math_attention()` (the fused SDPA kernels have no double backward)."""
    names = list(params)
    current = dict(params)
    with math_attention():
        for _ in range(inner_steps):
            grads = torch.autograd.grad(attacker(unet_at(unet, current)), [current[n] for n in names],
                                        create_graph=True, allow_unused=True)
            current = {n: (current[n] - inner_lr * g) if g is not None else current[n] for n, g in zip(names, grads)}
        return backdoor(unet_at(unet, current))


def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class Trajectories:
    """Amortized long-horizon retention (SPEC section 7): `slots` simulated attackers live ACROSS outer
    steps, each a displacement delta_k of the weights plus its own Adam state. Every outer step each slot
    takes one attacker Adam step at theta + delta_k (the attacker's own lr), the backdoor loss's gradient
    is taken at the new theta + delta_k and applied at theta, and a slot that reaches `horizon` steps
    restarts from theta. Depths are staggered, so at any time the slots cover the whole attack horizon at
    a cost per outer step of `slots` attacker steps, independent of the horizon. With `per_step` = k > 0
    only k slots (round robin) advance and give a gradient per outer step: 1/k-th of the cost, at the
    price of displacements computed at older weights (issue 5: the PersGuard step over a plain one).

    Each slot attacks one entry for its whole life: `pick()` chooses it at every restart, as an entry id
    or as a dict {"entry": id, and optionally "lr", "horizon", "only" (substrings of the parameter names
    the attacker trains, e.g. a LoRA attacker's attention projections), "prompt", "prior"}: gray-box
    training draws a different attacker per slot; `attacker(f, slot)` sees the whole slot. A slot
    created at depth d > 0 first runs d attacker steps (no backdoor gradient), so from the first outer
    step the slots really sit along the whole horizon: without this catch-up, a run shorter than the
    horizon never simulated an attack longer than the run (a 150-step run, 400-step attacks: at most 150).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], slots: int, horizon: int, lr: float, pick: Callable,
                 per_step: int = 0):
        self.names, self.horizon, self.lr, self.pick = list(params), horizon, lr, pick
        self.slots = [self._fresh(params, stagger=(k, slots)) for k in range(slots)]
        self.per_step, self.cursor = per_step, 0

    def _fresh(self, params, stagger: tuple[int, int] = (0, 1)) -> dict:
        spec = self.pick()
        spec = dict(spec) if isinstance(spec, dict) else {"entry": spec}
        spec.setdefault("lr", self.lr)
        spec.setdefault("horizon", self.horizon)
        zeros = lambda: {n: torch.zeros_like(params[n], requires_grad=False) for n in self.names}  # noqa: E731
        return {"delta": zeros(), "m": zeros(), "v": zeros(), "age": 0,
                "depth": stagger[0] * spec["horizon"] // stagger[1], **spec}

    def step(self, unet, params: dict[str, torch.nn.Parameter], attacker: Callable,
             backdoor: Callable) -> tuple[float, dict[str, torch.Tensor]]:
        """`attacker(f, entry)` / `backdoor(f, entry)`; returns (mean backdoor loss, summed gradient / slots)."""
        grad_sum = {n: torch.zeros_like(params[n]) for n in self.names}
        total = 0.0
        n_slots = len(self.slots)
        active = range(n_slots)
        if 0 < self.per_step < n_slots:   # round robin: the others wait (their displacements go stale)
            active = [(self.cursor + i) % n_slots for i in range(self.per_step)]
            self.cursor = (self.cursor + self.per_step) % n_slots
        for k in active:
            s = self.slots[k]
            if s["depth"] >= s.get("horizon", self.horizon):
                self.slots[k] = s = self._fresh(params)
            while s["age"] < s["depth"]:   # catch-up of a slot created deeper than it has run
                self._attack(unet, params, attacker, s)
            self._attack(unet, params, attacker, s)
            s["depth"] += 1
            w = {n: (params[n].detach() + s["delta"][n]).requires_grad_(True) for n in self.names}
            loss = backdoor(unet_at(unet, w), s["entry"])
            grads = torch.autograd.grad(loss, [w[n] for n in self.names], allow_unused=True)
            for n, g in zip(self.names, grads):
                if g is not None:
                    grad_sum[n] += g / len(active)
            total += loss.item() / len(active)
        return total, grad_sum

    def _attack(self, unet, params, attacker: Callable, s: dict) -> None:
        """One simulated attacker Adam step of slot `s` at theta + delta."""
        w = {n: (params[n].detach() + s["delta"][n]).requires_grad_(True) for n in self.names}
        grads = torch.autograd.grad(attacker(unet_at(unet, w), s), [w[n] for n in self.names], allow_unused=True)
        s["age"] += 1
        only = s.get("only")
        with torch.no_grad():
            for n, g in zip(self.names, grads):
                if g is not None and (not only or any(o in n for o in only)):
                    _adam_step(s["delta"][n], g, s["m"][n], s["v"][n], s["age"], s.get("lr", self.lr))

    def state_dict(self) -> dict:
        return {"slots": self.slots, "cursor": self.cursor}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        state = state if isinstance(state, dict) else {"slots": state, "cursor": 0}   # older checkpoints
        self.slots, self.cursor = state["slots"], state["cursor"]
