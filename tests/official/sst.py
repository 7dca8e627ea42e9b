"""Sparse Spectral Training (Zhao, Zhang, Li, Liu, Cannistraci, ICML 2025; arXiv 2405.15481v3), its
update transcribed in numpy (float64).

The official code (biomedical-cybernetics/sparse-spectral-training) could not be fetched here, so
the SST lines cite the paper: "§" a section, "Alg. 2" its Algorithm 2 (Sparse Spectral Training),
"App. F.2" its appendix F.2. The optimizer lines cite the AdamW they run on, torch's, at the
version the `parity` extra installs (`pytorch/pytorch@v2.13.0:torch/optim/adam.py:line`, its
`_single_tensor_adam` with decoupled weight decay). The sampler is torch.multinomial without
replacement as torch computes it; its Exp(1) draws q are an input, so a test can give colax and
this reference the same randomness. Layout: W [in, out] = U diag(sigma) Vᵀ, U [in, m], V [out, m].
"""

import numpy as np


def probabilities(sigma):
    """p [m] of sigma [m]."""
    return 0.5 * (1.0 / sigma.size + sigma / sigma.sum())  # §4.4: p(i) = (1/m + Σ_i / Σ_j Σ_j) / 2


def multinomial(p, q, r):
    """torch.multinomial(p, r, replacement=False) given its Exp(1) draws q [m] (§4.4 "multinomial sampling")."""
    # pytorch/pytorch@c6f25b0a02b6d63ce8c86eab8f0a0eb5c1c64029:aten/src/ATen/native/Distributions.cpp,
    # multinomial_out's no-replacement path: q.exponential_(1); div_out(q, self, q); topk_out(q, n_sample)
    return np.argsort(-(p / q), kind="stable")[:r]


class AdamW:
    """torch's AdamW on one array (moments zeroed at creation and by `reset`; the step count t is shared)."""

    def __init__(self, shape, b1, b2, eps, weight_decay):
        self.m, self.v = np.zeros(shape), np.zeros(shape)
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, weight_decay

    def reset(self):
        """The moments zeroed, the step count kept (the lr re-warms: App. F.2)."""
        self.m, self.v = np.zeros_like(self.m), np.zeros_like(self.v)

    def step(self, param, grad, lr, t):
        """param after update t (1, 2, ...) with gradient `grad` at learning rate `lr`."""
        param = param * (1 - lr * self.wd)  # adam.py:419 param.mul_(1 - lr * weight_decay)
        self.m = self.m + (1 - self.b1) * (grad - self.m)  # adam.py:456 exp_avg.lerp_(grad, 1 - beta1)
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad  # adam.py:475
        bias_correction1, bias_correction2 = 1 - self.b1 ** t, 1 - self.b2 ** t  # adam.py:530-531
        denom = np.sqrt(self.v) / np.sqrt(bias_correction2) + self.eps  # adam.py:535, 544
        return param - lr / bias_correction1 * self.m / denom  # adam.py:533, 546


class Layer:
    """One SST layer (§4.1: W = U Σ Vᵀ, the weight itself removed): u [in, m], sigma [m], v [out, m],
    the r active indices I (`active`) whose vectors train, and AdamW state for sigma and U_I, V_I."""

    def __init__(self, u, sigma, v, active, adam):
        self.u, self.sigma, self.v = (np.array(x, np.float64) for x in (u, sigma, v))
        self.active = np.array(active)
        r = self.active.size
        self.opt = dict(sigma=AdamW(sigma.shape, **adam), u=AdamW((u.shape[0], r), **adam),
                        v=AdamW((v.shape[0], r), **adam))

    def weight(self):
        """W [in, out]."""
        return (self.u * self.sigma) @ self.v.T  # §4.1: h = U Σ Vᵀ x

    def step(self, g, lr, t):
        """Update t (Alg. 2, one step of an iteration) with g = dL/dW [in, out]."""
        i = self.active
        g_sigma = np.einsum("im,io,om->m", self.u, g, self.v)  # §4.2: ∂L/∂Σ_i = U_iᵀ (∂L/∂W) V_i
        g_u = g @ self.v[:, i]  # §4.2 enhanced gradient: ∇̃U_i = (∂L/∂W) V_i (without the factor Σ_i)
        g_v = g.T @ self.u[:, i]  # §4.2 enhanced gradient: ∇̃V_i = (∂L/∂W)ᵀ U_i
        sigma = self.opt["sigma"].step(self.sigma, g_sigma, lr, t)  # Alg. 2: update all of Σ
        self.sigma = np.maximum(sigma, 0)  # §4.1 / Alg. 2: Σ = max(Σ, 0)
        u, v = self.opt["u"].step(self.u[:, i], g_u, lr, t), self.opt["v"].step(self.v[:, i], g_v, lr, t)
        self.u[:, i] = u / np.linalg.norm(u, axis=0)  # §4.1 / Alg. 2: U_i normalised to unit norm after its update
        self.v[:, i] = v / np.linalg.norm(v, axis=0)  # likewise V_i

    def new_iteration(self, q, refactor):
        """The end of an iteration (Alg. 2): with `refactor` (the end of a round) U, Σ, Vᵀ = SVD(U Σ Vᵀ);
        then r new indices from Σ with the draws q [m], their vectors' moments zeroed (and Σ's after an SVD)."""
        if refactor:
            u, sigma, vt = np.linalg.svd(self.weight(), full_matrices=False)  # §4.3 / Alg. 2: re-SVD once per round
            self.u, self.sigma, self.v = u, sigma, vt.T
            self.opt["sigma"].reset()  # the SVD reorders Σ: its moments no longer belong to their entries
        self.active = multinomial(probabilities(self.sigma), q, self.active.size)  # §4.4 / Alg. 2: once per iteration
        self.opt["u"].reset()  # the newly sampled vectors start from zero moments (App. F.2 re-warmup)
        self.opt["v"].reset()


def train(layers, grad, lrs, draws, iteration_steps, round_iterations):
    """Alg. 2 over len(lrs) updates: update t (1, 2, ...) at lrs[t - 1] with grad(j, W) = dL/dW of
    layer j; after every `iteration_steps` updates a new iteration, after every `round_iterations`
    iterations a re-SVD first; draws(t, j) the Exp(1) draws of layer j's sampling after update t.
    Yields t after each update (and its iteration's end) so the caller can compare states."""
    for t, lr in enumerate(lrs, start=1):
        for j, layer in enumerate(layers):
            layer.step(grad(j, layer.weight()), lr, t)
        if t % iteration_steps == 0:  # Alg. 2: T3 steps per iteration, T2 iterations per round
            for j, layer in enumerate(layers):
                layer.new_iteration(draws(t, j), refactor=t % (iteration_steps * round_iterations) == 0)
        yield t
