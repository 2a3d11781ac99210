"""SOAP against an oracle written from the papers' equations, in float64, one matrix at a time.

The oracle follows SOAP (Vyas et al. 2024, arXiv 2409.11321, Alg. 3 and the eigenbasis refresh
of Alg. 4) and KL-Shampoo (Lin et al. 2025, arXiv 2509.03378, the factor update
``L <- b L + (1-b)/n G R^-1 G^T``), with the order of operations optim.soap documents (factors,
then refresh, then Adam). It keeps the first moment in PARAMETER space as the paper writes it,
so it also checks that optim.soap's eigenbasis-space ``exp_avg`` is carried across refreshes
correctly, and it does not re-sort after the power step, so it checks that re-sort is an exact
relabelling.
"""

from __future__ import annotations

import pytest
import torch

from optim.soap import SOAP

# Both sides run in float64 (optim.soap keeps a float64 parameter's state in float64), so the
# comparison checks the equations, not rounding: measured agreement is <= 2e-9 over 8 steps,
# relative to the largest parameter change. RTOL leaves 50x headroom for other BLAS builds.
RTOL = 1e-7
STEPS = 8
# Adam divides by sqrt(v) + eps (1e-8): at step 1, G's own singular bases diagonalize Q^T G Q
# and round-off in its off-diagonal would be scaled up to +-1 if it were not far below eps.
GRAD_SCALE = 1e-4
# KL-Shampoo weighs directions by 1/lambda: a non-square gradient leaves the larger factor
# rank-deficient at step 1, and the weights of its null space are then round-off (both here and
# in Emerging-Optimizers). KL cases therefore use square matrices, whose factors are full rank.
KL_SHAPE = (16, 16)
PLAIN_SHAPE = (24, 16)


class ReferenceSOAP:
    """Dense float64 SOAP / KL-Shampoo for one (m, n) matrix, straight from the equations."""

    def __init__(self, shape: tuple[int, int], *, lr: float, betas=(0.9, 0.95),
                 shampoo_beta=0.95, eps=1e-8, weight_decay=0.0, kl=False, use_eigh=False,
                 power_iter_steps=1, frequency=1, nesterov=False, correct_bias=True, left=True,
                 right=True):
        m, n = shape
        self.hp = dict(lr=lr, betas=betas, sb=shampoo_beta, eps=eps, wd=weight_decay, kl=kl,
                       eigh=use_eigh, iters=power_iter_steps, f=frequency, nesterov=nesterov,
                       bias=correct_bias)
        d = torch.float64
        self.L = torch.zeros(m, m, dtype=d) if left else None
        self.R = torch.zeros(n, n, dtype=d) if right else None
        self.QL = torch.eye(m, dtype=d)
        self.QR = torch.eye(n, dtype=d)
        self.M = torch.zeros(m, n, dtype=d)   # first moment, parameter space (paper)
        self.V = torch.zeros(m, n, dtype=d)   # second moment, eigenbasis coordinates
        self.t = 0

    def _inverse(self, F, Q):
        lam = torch.diagonal(Q.T @ F @ Q).clamp(min=self.hp["eps"])
        return Q @ torch.diag(1.0 / lam) @ Q.T

    def _factors(self, G, b):
        m, n = G.shape
        if self.hp["kl"]:
            Rinv = self._inverse(self.R, self.QR) if self.R is not None else torch.eye(n).double()
            Linv = self._inverse(self.L, self.QL) if self.L is not None else torch.eye(m).double()
            new_L, new_R = G @ Rinv @ G.T / n, G.T @ Linv @ G / m
        else:
            new_L, new_R = G @ G.T, G.T @ G
        if self.L is not None:
            self.L = b * self.L + (1 - b) * new_L
        if self.R is not None:
            self.R = b * self.R + (1 - b) * new_R

    def _refresh_one(self, F, Q, axis):
        lam = torch.diagonal(Q.T @ F @ Q)
        order = torch.argsort(lam, descending=True)
        self.V = self.V.index_select(axis, order)
        if self.hp["eigh"] or self.t == 1:
            return torch.linalg.eigh(F)[1].flip(-1)
        Q = Q[:, order]
        for _ in range(self.hp["iters"]):
            Q = torch.linalg.qr(F @ Q)[0]
        return Q

    def step(self, W, G):
        hp = self.hp
        self.t += 1
        t = self.t
        # bias correction divides by 1 - beta^t; without it every correction is 1
        def bc(beta, k):
            return 1 - beta**k if hp["bias"] else 1.0

        b = 1 - (1 - hp["sb"]) / bc(hp["sb"], t)
        self._factors(G, b)
        if (t - 1) % hp["f"] == 0:
            if self.L is not None:
                self.QL = self._refresh_one(self.L, self.QL, 0)
            if self.R is not None:
                self.QR = self._refresh_one(self.R, self.QR, 1)
        b1, b2 = hp["betas"]
        self.M = b1 * self.M + (1 - b1) * G
        Gp, Mp = self.QL.T @ G @ self.QR, self.QL.T @ self.M @ self.QR
        self.V = b2 * self.V + (1 - b2) * Gp**2
        if hp["nesterov"]:
            Mhat = b1 * Mp / bc(b1, t + 1) + (1 - b1) * Gp / bc(b1, t)
        else:
            Mhat = Mp / bc(b1, t)
        N = Mhat / ((self.V / bc(b2, t)).sqrt() + hp["eps"])
        return W * (1 - hp["lr"] * hp["wd"]) - hp["lr"] * self.QL @ N @ self.QR.T


def _gradients(shape, steps, seed=0):
    """Gradients A Z B with A, B spectra spread over [0.5, 1]: distinct, stable eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape

    def spread(k):
        U = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]
        return U @ torch.diag(torch.linspace(1.0, 0.5, k, dtype=torch.float64)) @ U.T

    A, B = spread(m), spread(n)
    return [GRAD_SCALE * A @ torch.randn(m, n, generator=gen, dtype=torch.float64) @ B
            for _ in range(steps)]


CASES = {
    "plain_qr": dict(),
    "plain_eigh": dict(use_eigh=True),
    "kl_qr": dict(use_kl_shampoo=True),
    "kl_eigh": dict(use_kl_shampoo=True, use_eigh=True),
    "nesterov_two_power_steps": dict(nesterov=True, power_iter_steps=2),
    "refresh_every_3": dict(precondition_frequency=3),
    "kl_refresh_every_3": dict(use_kl_shampoo=True, precondition_frequency=3),
    "no_bias_correction": dict(correct_bias=False),
    "kl_nesterov_no_bias_correction": dict(use_kl_shampoo=True, nesterov=True,
                                           correct_bias=False),
    "other_betas": dict(betas=(0.8, 0.99), shampoo_beta=0.9, precondition_frequency=2),
    "kl_other_betas": dict(use_kl_shampoo=True, betas=(0.7, 0.9), shampoo_beta=0.8),
}


def _run_both(shape, kwargs, *, max_precond_dim=8192, left=True, right=True,
              dtype=torch.float64):
    grads = _gradients(shape, STEPS)
    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(W0.to(dtype).clone())
    opt = SOAP([p], lr=0.01, weight_decay=0.1, fp32_matmul_prec="highest",
               qr_fp32_matmul_prec="highest", max_precond_dim=max_precond_dim, **kwargs)
    ref = ReferenceSOAP(shape, lr=0.01, weight_decay=0.1, kl=kwargs.get("use_kl_shampoo", False),
                        betas=kwargs.get("betas", (0.9, 0.95)),
                        shampoo_beta=kwargs.get("shampoo_beta", 0.95),
                        correct_bias=kwargs.get("correct_bias", True),
                        use_eigh=kwargs.get("use_eigh", False),
                        power_iter_steps=kwargs.get("power_iter_steps", 1),
                        frequency=kwargs.get("precondition_frequency", 1),
                        nesterov=kwargs.get("nesterov", False), left=left, right=right)
    W = W0.clone()
    errors = []
    for G in grads:
        p.grad = G.to(dtype)
        opt.step()
        W = ref.step(W, G)
        errors.append(((p.detach().double() - W).abs().max() / (W - W0).abs().max()).item())
    return errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_soap_follows_the_paper_equations_over_several_steps(case):
    shape = KL_SHAPE if "kl" in case else PLAIN_SHAPE
    errors = _run_both(shape, CASES[case])
    assert max(errors) < RTOL, errors


@pytest.mark.parametrize("use_kl_shampoo", [False, True])
def test_one_sided_soap_above_max_precond_dim_treats_the_missing_side_as_identity(use_kl_shampoo):
    errors = _run_both((16, 40), {"use_kl_shampoo": use_kl_shampoo}, max_precond_dim=32,
                       right=False)
    assert max(errors) < RTOL, errors
