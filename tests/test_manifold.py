"""Batched Stiefel math: projections, landing field, retractions, stable rank (float64 references)."""

from __future__ import annotations

import pytest
import torch

from polar_vbll import manifold as M
from polar_vbll.manifold import (
    RETRACTIONS,
    exact_fp32_matmul,
    landing_field,
    orthogonality_error,
    project_tangent,
    random_stiefel,
    retract,
    retract_cholqr2,
    retract_polar,
    retract_qr,
    skew,
    stable_rank,
    stable_rank_lowrank,
    sym,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _tangent(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random tangent vector at ``x`` (built without project_tangent: X A + (I - X X^T) B, A skew)."""
    n, r = x.shape[-2:]
    a = _randn(*x.shape[:-2], r, r, seed=seed)
    a = a - a.transpose(-2, -1)
    b = _randn(*x.shape, seed=seed + 1)
    return x @ a + b - x @ (x.transpose(-2, -1) @ b)


def _gram_schmidt(x: torch.Tensor) -> torch.Tensor:
    """Reference Q with positive diag(R): modified Gram-Schmidt twice, in float64, one factor at a time."""
    out = x.to(F64).clone()
    for _ in range(2):
        for j in range(out.shape[-1]):
            for k in range(j):
                out[..., :, j] -= (out[..., :, k] * out[..., :, j]).sum(-1, keepdim=True) * out[..., :, k]
            out[..., :, j] /= out[..., :, j].norm(dim=-1, keepdim=True)
    return out


def _with_condition(batch: int, n: int, r: int, cond: float, seed: int = 0) -> torch.Tensor:
    """float64 ``(batch, n, r)`` matrices with singular values spread from 1 to 1/cond."""
    u = random_stiefel(batch, n=n, r=r, generator=_gen(seed), dtype=F64)
    v = random_stiefel(batch, n=r, r=r, generator=_gen(seed + 1), dtype=F64)
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=F64)
    return (u * s) @ v.transpose(-2, -1)


# ------------------------------------------------------------------------------------------- basics
def test_sym_and_skew_conventions() -> None:
    a = _randn(3, 4, 4)
    assert torch.allclose(sym(a), 0.5 * (a + a.mT))
    assert torch.allclose(skew(a), a - a.mT)  # PoLAR's convention: no 1/2
    assert torch.allclose(sym(a) + 0.5 * skew(a), a)


def test_random_stiefel_is_orthonormal_and_deterministic() -> None:
    x = random_stiefel(5, n=40, r=6, generator=_gen(3))
    assert x.shape == (5, 40, 6) and x.dtype == torch.float32 and x.is_contiguous()
    assert orthogonality_error(x).max() < 2e-6
    assert torch.equal(x, random_stiefel(5, n=40, r=6, generator=_gen(3)))
    x64 = random_stiefel(5, n=40, r=6, generator=_gen(3), dtype=F64)
    assert torch.allclose(x64.float(), x)
    with pytest.raises(ValueError):
        random_stiefel(n=3, r=4)


def test_orthogonality_error_known_value() -> None:
    q = random_stiefel(2, n=10, r=3, dtype=F64, generator=_gen(0))
    err = orthogonality_error(torch.stack([q[0], 2 * q[1]]))
    assert err.dtype == F64 and err.shape == (2,)
    assert err[0] < 1e-14
    assert err[1] == pytest.approx(3 * 3**0.5)  # ||4I - I||_F with r = 3


# --------------------------------------------------------------------------------------- tangent space
def test_project_tangent_is_the_orthogonal_projection() -> None:
    x = random_stiefel(4, n=12, r=3, dtype=F64, generator=_gen(0))
    g = _randn(4, 12, 3, seed=5)
    p = project_tangent(x, g)
    xtp = x.mT @ p
    assert torch.allclose(xtp + xtp.mT, torch.zeros_like(xtp), atol=1e-12)  # tangent
    assert torch.allclose(project_tangent(x, p), p, atol=1e-12)  # idempotent
    normal = g - p  # must be X S with S symmetric
    s = x.mT @ normal
    assert torch.allclose(s, s.mT, atol=1e-12)
    assert torch.allclose(normal, x @ s, atol=1e-12)
    xi = _tangent(x)
    assert torch.allclose((p * xi).sum((-2, -1)), (g * xi).sum((-2, -1)), atol=1e-12)


def _loss(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((a @ x - c) ** 2).sum() + torch.sin(x).sum()


@pytest.mark.parametrize("method", RETRACTIONS)
def test_riemannian_gradient_matches_finite_differences_through_retraction(method: str) -> None:
    """d/dt f(retract(X + t xi)) at t = 0 equals <project_tangent(X, grad f), xi> for tangent xi."""
    x = random_stiefel(3, n=10, r=4, dtype=F64, generator=_gen(0))
    a, c = _randn(3, 7, 10, seed=1), _randn(3, 7, 4, seed=2)
    xg = x.clone().requires_grad_()
    _loss(xg, a, c).backward()
    rgrad = project_tangent(x, xg.grad)
    xi = _tangent(x, seed=7)
    t = 1e-5
    fd = (_loss(retract(x + t * xi, method), a, c) - _loss(retract(x - t * xi, method), a, c)) / (2 * t)
    assert fd.item() == pytest.approx((rgrad * xi).sum().item(), rel=1e-7)


# ---------------------------------------------------------------------------------------- landing field
def _landing_naive(x: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """The n x n formula from PoLAR's code: skew(G X^T) X + lam X (X^T X - I)."""
    a = g @ x.mT
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return (a - a.mT) @ x + lam * x @ (x.mT @ x - eye)


def test_landing_field_matches_naive_formula_on_and_off_the_manifold() -> None:
    x = random_stiefel(5, n=30, r=4, dtype=F64, generator=_gen(0))
    g = _randn(5, 30, 4, seed=1)
    for point in (x, x + 0.1 * _randn(5, 30, 4, seed=2)):
        assert torch.allclose(landing_field(point, g, 0.7), _landing_naive(point, g, 0.7), atol=1e-12)


def test_landing_field_on_manifold_is_tangent_and_zero_at_a_critical_point() -> None:
    x = random_stiefel(3, n=16, r=4, dtype=F64, generator=_gen(0))
    field = landing_field(x, _randn(3, 16, 4, seed=1), lam=5.0)  # the penalty vanishes on the manifold
    xtf = x.mT @ field
    assert torch.allclose(xtf + xtf.mT, torch.zeros_like(xtf), atol=1e-12)
    # f(X) = -tr(X^T S X)/2 is critical at eigenvectors of S: there the whole field must vanish.
    b = _randn(3, 16, 16, seed=3)
    s = b + b.mT
    evecs = torch.linalg.eigh(s).eigenvectors[..., -4:]
    grad = -s @ evecs
    assert grad.abs().max() > 1  # the Euclidean gradient itself is not zero
    assert landing_field(evecs, grad, lam=5.0).abs().max() < 1e-12


def test_landing_penalty_is_orthogonal_to_the_descent_term_and_pulls_back() -> None:
    x = random_stiefel(4, n=20, r=5, dtype=F64, generator=_gen(0))
    off = x + 0.05 * _randn(4, 20, 5, seed=1)
    g = _randn(4, 20, 5, seed=2)
    descent = landing_field(off, g, lam=0.0)
    penalty = landing_field(off, torch.zeros_like(g), lam=1.0)
    assert torch.allclose(penalty, off @ (off.mT @ off - torch.eye(5, dtype=F64)), atol=1e-14)
    inner = (descent * penalty).sum((-2, -1))
    assert inner.abs().max() < 1e-12 * descent.norm() * penalty.norm()  # orthogonal everywhere
    before = orthogonality_error(off)
    after = orthogonality_error(off - 0.1 * penalty)
    assert (after < 0.9 * before).all()


# ------------------------------------------------------------------------------------------- retractions
@pytest.mark.parametrize("method", RETRACTIONS)
def test_retraction_fp32_is_orthonormal(method: str) -> None:
    noise = _randn(8, 128, 8, seed=1, dtype=torch.float32)
    x = random_stiefel(8, n=128, r=8, generator=_gen(0)) + 0.05 * noise
    y = retract(x, method)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.is_contiguous()
    assert orthogonality_error(y).max() < 2e-6


@pytest.mark.parametrize("fn", [retract_qr, retract_cholqr2], ids=["qr", "cholqr2"])
@pytest.mark.parametrize("cond", [1.0, 30.0, 300.0])
def test_qr_type_retractions_equal_the_positive_diagonal_qr(fn, cond: float) -> None:
    """Both give the Q of X = QR with diag(R) > 0 (reference: float64 Gram-Schmidt)."""
    x = _with_condition(6, 48, 6, cond)
    ref = _gram_schmidt(x)
    assert torch.allclose(fn(x), ref, atol=1e-11 * cond)
    y32 = fn(x.float())
    assert (y32.double() - ref).abs().max() < 2e-6 * cond
    assert orthogonality_error(y32).max() < 2e-6


@pytest.mark.parametrize("cond", [1.0, 100.0, 1e3])
def test_polar_retraction_equals_u_vt_of_the_svd(cond: float) -> None:
    x = _with_condition(5, 40, 6, cond)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    assert torch.allclose(retract_polar(x), u @ vh, atol=1e-12 * cond)
    y32 = retract_polar(x.float())
    assert (y32.double() - u @ vh).abs().max() < 2e-6 * cond
    assert orthogonality_error(y32).max() < 2e-6


@pytest.mark.parametrize("method", RETRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_retraction_leaves_points_on_the_manifold_unchanged(method: str, dtype: torch.dtype) -> None:
    q = random_stiefel(4, n=64, r=8, dtype=dtype, generator=_gen(2))
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert (retract(q, method) - q).abs().max() < tol


@pytest.mark.parametrize("method", RETRACTIONS)
def test_batched_retraction_equals_per_factor(method: str) -> None:
    x = _randn(2, 3, 20, 4, seed=4)
    y = retract(x, method)
    assert y.shape == x.shape
    per = torch.stack([torch.stack([retract(x[i, j], method) for j in range(3)]) for i in range(2)])
    assert torch.allclose(y, per, atol=1e-13)


def _near_duplicate(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Four factors; factor 2 has column 1 = column 0 + 1e-5 noise (Gram condition ~1e11)."""
    x = random_stiefel(4, n=64, r=6, generator=_gen(0), dtype=F64) + 0.01 * _randn(4, 64, 6, seed=1)
    x[2, :, 1] = x[2, :, 0] + 1e-5 * _randn(64, seed=2)
    return x.to(dtype)


def test_cholqr2_falls_back_to_qr_for_an_ill_conditioned_factor_only(monkeypatch) -> None:
    x = _near_duplicate()
    gram_cond = torch.linalg.cond(x.double().mT @ x.double())
    assert gram_cond[2] > 1e8 and (gram_cond[[0, 1, 3]] < 10).all()  # only factor 2 is ill-conditioned
    calls: list[int] = []
    real = M._qr_positive

    def spy(x: torch.Tensor):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(M, "_qr_positive", spy)
    y = retract_cholqr2(x)
    assert calls == [1]  # only the ill-conditioned factor went to QR
    assert orthogonality_error(y).max() < 2e-6
    assert torch.allclose(y[2], real(x[2:3])[0], atol=1e-6)
    calls.clear()
    y_polar = retract_polar(x)  # shares the fallback
    assert calls == [1] and orthogonality_error(y_polar).max() < 2e-6


@pytest.mark.parametrize("method", RETRACTIONS)
def test_retractions_survive_a_rank_deficient_factor(method: str) -> None:
    x = _near_duplicate()
    x[1, :, 3] = x[1, :, 2]  # exactly duplicated column: the Cholesky breaks down
    y = retract(x, method)
    assert torch.isfinite(y).all()
    assert orthogonality_error(y).max() < 2e-6


@pytest.mark.parametrize(("cond_x", "falls_back"), [(800.0, False), (1200.0, True)])
def test_cholqr2_condition_threshold_is_about_1e6_on_the_gram_in_fp32(
    monkeypatch, cond_x, falls_back
) -> None:
    """Columns scaled from 1 to 1/cond_x: Gram condition 6.4e5 stays on CholQR2, 1.44e6 goes to QR (the
    a-posteriori check alone would not fire there: one pass leaves ||Q^T Q - I|| ~ 0.2)."""
    x = random_stiefel(n=64, r=6, generator=_gen(0)) * torch.logspace(
        0, -torch.log10(torch.tensor(cond_x)), 6
    )
    calls: list[int] = []
    real = M._qr_positive
    monkeypatch.setattr(M, "_qr_positive", lambda x: calls.append(x.shape[0]) or real(x))
    y = retract_cholqr2(x[None])
    assert bool(calls) == falls_back
    assert orthogonality_error(y).max() < 2e-6


def test_rank_deficient_factor_needs_the_fallback(monkeypatch) -> None:
    """Guards the test above: with the fallback disabled, CholQR2 cannot orthonormalise this factor."""
    x = _near_duplicate()
    x[1, :, 3] = x[1, :, 2]
    monkeypatch.setattr(M, "_qr_positive", lambda x: (x, x[..., : x.shape[-1], :]))
    assert orthogonality_error(retract_cholqr2(x))[1] > 0.1


def test_retract_rejects_unknown_method_and_wide_input() -> None:
    with pytest.raises(ValueError, match="unknown retraction"):
        retract(torch.zeros(5, 2), "householder")  # type: ignore[arg-type]
    for fn in (retract_qr, retract_cholqr2, retract_polar):
        with pytest.raises(ValueError, match="n >= r"):
            fn(torch.randn(2, 5))


def test_exact_fp32_matmul_switches_and_restores_reduced_precision() -> None:
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        with exact_fp32_matmul("cpu"):
            assert backend.fp32_precision == "ieee"
            x = random_stiefel(2, n=32, r=4, generator=_gen(0)) + 0.01
            assert orthogonality_error(retract_cholqr2(x)).max() < 2e-6
        assert backend.fp32_precision == "bf16"
    finally:
        backend.fp32_precision = before
    torch.get_float32_matmul_precision()  # legacy API still readable (no mixed-API error)


def test_exact_fp32_matmul_turns_off_tf32_for_cuda_and_restores_it() -> None:
    """Flags only (no GPU needed): HF-style ``allow_tf32 = True`` is off inside, back on after."""
    cuda = torch.backends.cuda.matmul
    before = cuda.allow_tf32
    try:
        cuda.allow_tf32 = True
        with exact_fp32_matmul("cuda"):
            assert cuda.fp32_precision == "ieee"
        assert cuda.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        cuda.allow_tf32 = before  # restored through the legacy API, as set (mixing APIs breaks reads)
    assert torch.get_float32_matmul_precision() == "highest"


# ------------------------------------------------------------------------------------------ stable rank
def test_stable_rank_known_values_and_zero() -> None:
    d = torch.zeros(2, 5, 4, dtype=F64)
    d[0, :3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    assert torch.allclose(stable_rank(d), torch.tensor([14 / 9, 0.0], dtype=F64))
    assert torch.allclose(stable_rank_lowrank(d[:, :4, :4]), torch.tensor([14 / 9, 0.0], dtype=F64))


def test_stable_rank_lowrank_equals_full_stable_rank_of_u_theta_vt() -> None:
    u = random_stiefel(3, n=50, r=6, dtype=F64, generator=_gen(0))
    v = random_stiefel(3, n=40, r=6, dtype=F64, generator=_gen(1))
    theta = _randn(3, 6, 6, seed=2) * torch.tensor([4.0, 2, 1, 1, 0.5, 0.1], dtype=F64)
    full = stable_rank(4.0 * u @ theta @ v.mT)
    assert torch.allclose(stable_rank_lowrank(theta), full, atol=1e-12)
    assert (full > 1.0).all() and (full < 6.0).all()
