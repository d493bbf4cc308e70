"""Batched Stiefel-manifold math for PoLAR factors.

Every function takes tall factors ``X`` of shape ``(..., n, r)`` with ``n >= r`` (a batch of factors of
equal shape) and works in the dtype it is given; callers keep factors in fp32 (never bf16). Nothing here
forms an ``n x n`` matrix: every product is ``O(n r^2)``, so a whole shape group of an LLM's factors is
handled by a few batched calls.

Conventions (see docs/method.md section 1):

- ``sym(A) = (A + A^T) / 2`` (the usual symmetric part);
- ``skew(A) = A - A^T`` *without* the 1/2, as in PoLAR's landing field code. It is twice the usual skew
  part; :func:`landing_field` relies on this convention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

Retraction = Literal["cholqr2", "qr", "polar"]
RETRACTIONS: tuple[str, ...] = get_args(Retraction)


# ----------------------------------------------------------------------------------------------- basics
def random_stiefel(
    *batch: int,
    n: int,
    r: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random orthonormal ``(..., n, r)`` factors: QR of a Gaussian with the sign of diag(R) fixed, so the
    result is Haar-distributed and deterministic for a given generator.

    The Gaussian is drawn in float64 on the generator's device (CPU without one), so a seed gives the same
    factors whatever ``dtype``/``device`` asks for.
    """
    if r > n:
        raise ValueError(f"a Stiefel factor needs n >= r, got n={n}, r={r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    g = torch.randn(*batch, n, r, generator=generator, dtype=torch.float64, device=gen_device)
    return retract_qr(g).to(dtype=dtype, device=device if device is not None else gen_device).contiguous()


def orthogonality_error(x: torch.Tensor) -> torch.Tensor:
    """``||X^T X - I||_F`` per factor (shape ``batch``), computed in float64 so it measures the factor, not
    the check."""
    x64 = x.detach().to(torch.float64)
    gram = x64.transpose(-2, -1) @ x64
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return torch.linalg.matrix_norm(gram - eye)


def sym(a: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(A + A^T) / 2`` of a batch of square matrices."""
    return 0.5 * (a + a.transpose(-2, -1))


def skew(a: torch.Tensor) -> torch.Tensor:
    """``A - A^T`` (PoLAR's convention: no 1/2, i.e. twice the usual skew-symmetric part)."""
    return a - a.transpose(-2, -1)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (``r x r``)."""
    return x.transpose(-2, -1) @ x


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    """``I_r`` matching the last dimension, dtype and device of ``x``."""
    return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)


def _check_tall(x: torch.Tensor, what: str = "X") -> None:
    if x.dim() < 2 or x.shape[-2] < x.shape[-1]:
        raise ValueError(f"{what} must be tall factors (..., n, r) with n >= r, got {tuple(x.shape)}")


# -------------------------------------------------------------------------------------- matmul precision
@contextmanager
def exact_fp32_matmul(device: torch.device | str) -> Iterator[None]:
    """Run fp32 matmuls on ``device`` in IEEE fp32 inside the block, restoring the setting afterwards.

    Why: training scripts commonly enable TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``, HF
    ``tf32=True``). A TF32 Gram or triangular product has a 10-bit mantissa, which caps a retraction's
    orthogonality at ~1e-3 instead of ~1e-7. Only the backend of ``device`` is touched, through torch's
    per-backend ``fp32_precision`` (reading and restoring it keeps torch's legacy flags consistent), and
    only when it is not already IEEE.
    """
    dev = torch.device(device)
    backend = (
        torch.backends.cuda.matmul if dev.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    )
    if not hasattr(backend, "fp32_precision"):  # torch < 2.9: only the legacy CUDA flag exists
        with _legacy_no_tf32(dev):
            yield
        return
    prev = backend.fp32_precision
    effective = prev if prev != "none" else getattr(torch.backends, "fp32_precision", "none")
    if effective in ("ieee", "none"):
        yield
        return
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = prev


@contextmanager
def _legacy_no_tf32(dev: torch.device) -> Iterator[None]:
    """:func:`exact_fp32_matmul` for torch versions without the per-backend ``fp32_precision``."""
    if dev.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


# ------------------------------------------------------------------------------------ tangent / landing
def project_tangent(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection (Euclidean metric) of ``G`` onto the tangent space at ``X``:
    ``G - X sym(X^T G)``. Applied to a Euclidean gradient it gives the Riemannian gradient."""
    return g - x @ sym(x.transpose(-2, -1) @ g)


def landing_field(x: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """PoLAR's landing field ``skew(G X^T) X + lam * X (X^T X - I)`` (with ``skew(A) = A - A^T``).

    Computed as ``G (X^T X) - X (G^T X) + lam * X (X^T X - I)``, which is the same expression expanded
    so that only ``r x r`` products appear: the ``n x n`` matrix ``G X^T`` is never formed (at n = 11008
    it would be 480 MB per factor in fp32). The first term is tangent on the manifold; the second is the
    gradient of ``lam/4 ||X^T X - I||_F^2`` and is orthogonal to the first everywhere, so it pulls ``X``
    back without fighting the descent (Ablin & Peyre 2022).
    """
    gram = _gram(x)
    gtx = g.transpose(-2, -1) @ x
    return g @ gram - x @ gtx + lam * (x @ (gram - _eye_like(x)))


def safe_landing_step(x: torch.Tensor, y: torch.Tensor, bound: float) -> torch.Tensor:
    """Keep a landing step inside the safe region ``||X^T X - I||_F <= bound``, per factor.

    ``x``: the factors before the step (inside the region); ``y``: after the unguarded step ``y = x - D``.
    A factor whose ``y`` is inside keeps it unchanged. For one that would leave:

    1. ``x`` first takes the landing field's normal step, ``x_p = x - mu x (x^T x - I) = x M`` with
       ``mu = 1 / (2 max(1, d))`` (``d = ||x^T x - I||_F``): for ``d <= 1`` the Newton-Schulz step, the normal
       term at ``lambda * step = 1/2``, which maps every eigenvalue ``e`` of ``x^T x - I`` to
       ``-3/4 e^2 + 1/4 e^3``, so ``d`` to at most ``d^2`` (the normal component of Xiong, Gao & Absil's
       landing); damped beyond, so that a factor far off is contracted too;
    2. then the largest fraction ``s`` in ``[0, 1]`` of ``D`` that provably stays inside: with ``A = x_p^T
       x_p - I``, ``B = x_p^T D + D^T x_p`` and ``C = D^T D``, ``||(x_p - s D)^T (x_p - s D) - I||_F =
       ||A - s B + s^2 C||_F <= ||A|| + s ||B|| + s^2 ||C||``, so ``s`` is the positive root of ``||C|| s^2 +
       ||B|| s = bound - ||A||`` (the safe step of Ablin & Peyre 2022 and Ablin, Vary, Gao & Absil 2024, for
       any direction, here the AdamW-normalised one).

    Four ``n x r^2`` products (``x^T x``, ``x^T D``, ``D^T D`` and ``x M``; every other quantity is an ``r x r``
    expression in them, e.g. ``y^T y = x^T x - x^T D - D^T x + D^T D``), no host sync (a per-factor
    ``torch.where``).
    """
    eye = _eye_like(x)
    delta = x - y
    e = _gram(x) - eye
    p = x.transpose(-2, -1) @ delta
    c_mat = _gram(delta)
    inside = torch.linalg.matrix_norm(e - p - p.transpose(-2, -1) + c_mat, keepdim=True) <= bound
    d = torch.linalg.matrix_norm(e, keepdim=True)
    m = eye - (0.5 / d.clamp_min(1.0)) * e  # x_p = x m
    room = (bound - torch.linalg.matrix_norm(m @ (e + eye) @ m - eye, keepdim=True)).clamp_min(0.0)
    mp = m @ p  # x_p^T D
    b = torch.linalg.matrix_norm(mp + mp.transpose(-2, -1), keepdim=True)
    c = torch.linalg.matrix_norm(c_mat, keepdim=True)
    denom = b + torch.sqrt(b * b + 4.0 * c * room)
    s = torch.where(denom > 0, 2.0 * room / denom.clamp_min(torch.finfo(x.dtype).tiny), 1.0).clamp(max=1.0)
    return torch.where(inside, y, x @ m - s * delta)


# ------------------------------------------------------------------------------------------ retractions
def retract_qr(x: torch.Tensor) -> torch.Tensor:
    """Q factor of ``X = QR`` with signs fixed so that ``diag(R) > 0`` (a zero diagonal counts as +).

    Without the sign fix the Q of a point already on the manifold may flip columns, which is not a
    retraction (it is not the identity at zero step)."""
    _check_tall(x)
    return _qr_positive(x)[0].contiguous()


def retract_cholqr2(x: torch.Tensor, max_cond: float | None = None) -> torch.Tensor:
    """Cholesky-QR applied twice ("CholQR2"): ``L L^T = X^T X``, ``X <- X L^{-T}``, once more.

    In exact arithmetic one pass gives the Q of ``X = QR`` with ``diag(R) = diag(L) > 0``, i.e. exactly
    :func:`retract_qr`. One fp32 pass loses orthogonality in proportion to ``cond(X^T X)``; the second pass
    (on an almost orthonormal input) restores it to working precision. It needs only a Gram, an ``r x r``
    Cholesky and a triangular solve per pass, which on GPU is ~100x faster than batched Householder QR.

    Per factor it falls back to :func:`retract_qr` when a Cholesky fails, when the Gram's condition
    estimate ``(max diag L / min diag L)^2`` exceeds ``max_cond`` (default ``0.125 / eps``: about 1e6 in
    fp32, 5.6e14 in fp64, beyond which one pass no longer gives the second a usable start), or when the
    first pass left ``||Q^T Q - I||_F > 0.5`` (an a-posteriori check that costs nothing: it is the second
    pass's Gram). The fallback costs one host sync per call to test whether any factor needs it.
    """
    _check_tall(x)
    return _cholqr2(_flatten(x), max_cond)[0].reshape(x.shape).contiguous()


def retract_polar(x: torch.Tensor, max_cond: float | None = None) -> torch.Tensor:
    """Polar factor ``X (X^T X)^{-1/2}``: the orthonormal matrix closest to ``X`` (``U V^T`` of its SVD).

    Computed as ``Q polar(R)`` from the CholQR2 factorisation ``X = QR`` (see :func:`retract_cholqr2`,
    whose fallback it shares) and an SVD of the ``r x r`` factor ``R``: ``X (X^T X)^{-1/2} =
    Q R (R^T R)^{-1/2} = Q polar(R)``; the tiny SVD runs in float64. Why not an eigendecomposition of the
    Gram directly: in fp32 that leaves ``||Y^T Y - I||`` near 3e-6 for a perfectly conditioned ``X`` and
    ~1e-3 at ``cond(X) = 100``, whereas this route stays at working precision (~5e-7).
    """
    _check_tall(x)
    q, rr = _cholqr2(_flatten(x), max_cond)
    u, _, vh = torch.linalg.svd(rr.to(torch.float64))  # r x r: float64 costs nothing, saves ~1e-6
    return (q @ (u @ vh).to(q.dtype)).reshape(x.shape).contiguous()


def retract(x: torch.Tensor, method: Retraction = "cholqr2") -> torch.Tensor:
    """Map ``X`` (typically ``X + step``) back onto St(n, r) with the named retraction, in IEEE fp32 even
    when TF32 matmuls are enabled globally (see :func:`exact_fp32_matmul`)."""
    fns = {"cholqr2": retract_cholqr2, "qr": retract_qr, "polar": retract_polar}
    if method not in fns:
        raise ValueError(f"unknown retraction {method!r}; choose one of {RETRACTIONS}")
    with exact_fp32_matmul(x.device):
        return fns[method](x)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``(..., n, r)`` -> ``(B, n, r)`` so a boolean mask can pick factors for a fallback."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _qr_positive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = QR`` with ``diag(R) >= 0`` (columns of Q and rows of R flipped together)."""
    q, rr = torch.linalg.qr(x)
    sign = torch.where(torch.diagonal(rr, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign.unsqueeze(-2), rr * sign.unsqueeze(-1)


def _cholqr2(xb: torch.Tensor, max_cond: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CholQR2 of ``(B, n, r)``: ``(Q, R)`` with ``X = QR``, ``diag(R) > 0``; QR fallback per factor."""
    limit = 0.125 / torch.finfo(xb.dtype).eps if max_cond is None else max_cond
    q1, l1, bad = _cholqr_pass(xb, _gram(xb), limit)
    gram2 = _gram(q1)
    bad |= torch.linalg.matrix_norm(gram2 - _eye_like(q1)) > 0.5
    q, l2, bad2 = _cholqr_pass(q1, gram2, limit)
    rr = (l1 @ l2).transpose(-2, -1)  # X = Q L2^T L1^T
    bad |= bad2 | ~torch.isfinite(q).flatten(1).all(-1)
    if xb.device.type == "cpu":
        if bool(bad.any()):  # the fallback is rare: QR only for the factors that need it (a sync is free here)
            q[bad], rr[bad] = _qr_positive(xb[bad])
        return q, rr
    # on an accelerator, no host sync inside an optimizer step: the QR of every factor, kept where CholQR2
    # failed (the QR costs about what CholQR2 does; both are small next to the backbone's step)
    q_fb, rr_fb = _qr_positive(xb)
    return torch.where(bad[:, None, None], q_fb, q), torch.where(bad[:, None, None], rr_fb, rr)


def _cholqr_pass(
    x: torch.Tensor, gram: torch.Tensor, max_cond: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Cholesky-QR pass on ``(B, n, r)``: ``(X L^{-T}, L, mask of factors it failed on)``."""
    chol, info = torch.linalg.cholesky_ex(gram)
    d = torch.diagonal(chol, dim1=-2, dim2=-1)
    d_min = d.min(-1).values
    bad = (info != 0) | ~(d_min > 0) | (d.max(-1).values.square() > max_cond * d_min.square())
    # Use I for failed factors, so they stay finite until the fallback replaces them.
    eye = _eye_like(x).expand_as(chol)
    chol = torch.where(bad[:, None, None], eye, chol)
    # X L^{-T} through the explicit r x r inverse: a batched matmul is ~4x faster than a batched
    # right-sided triangular solve on CPU (and faster on GPU), and L has cond <= sqrt(max_cond) here.
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return x @ chol_inv.transpose(-2, -1), chol, bad


# ---------------------------------------------------------------------------------------- stable rank
def stable_rank(delta: torch.Tensor) -> torch.Tensor:
    """``||dW||_F^2 / ||dW||_2^2`` per matrix of a ``(..., m, n)`` batch: the rank-collapse diagnostic
    (LoRA's stays near 1, PoLAR's grows with r). 0 for a zero matrix (e.g. at init, Theta = 0).

    Needs singular values of the full matrix; for an adapter prefer :func:`stable_rank_lowrank`.
    """
    d = delta.detach()
    if d.dtype not in (torch.float32, torch.float64):
        d = d.float()
    s = torch.linalg.svdvals(d)
    return _ratio(s)


def stable_rank_lowrank(theta: torch.Tensor) -> torch.Tensor:
    """Stable rank of ``dW = U Theta V^T`` from the ``(..., r, r)`` core alone.

    With orthonormal U and V, ``U Theta V^T`` has exactly the singular values of ``Theta`` (U and V only
    rotate), so its stable rank is Theta's: ``r x r`` work instead of an SVD of an ``out x in`` matrix. The
    scale ``alpha / r`` cancels in the ratio. Off the manifold (landing drift) it is an approximation whose
    error is of the order of the orthogonality error.
    """
    return _ratio(torch.linalg.svdvals(theta.detach().to(torch.float64)))


def _ratio(s: torch.Tensor) -> torch.Tensor:
    """``sum s^2 / max s^2`` over the last dimension, 0 where every ``s`` is 0."""
    top = s[..., 0].square()
    return torch.where(top > 0, s.square().sum(-1) / torch.where(top > 0, top, 1.0), 0.0)
