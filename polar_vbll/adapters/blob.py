"""BLoB: Bayesian low-rank adaptation by backpropagation (Wang, Shi, Han, Metaxas, Wang; NeurIPS 2024), as an
adapter kind beside LoRA. Written from the paper and its reference code (Wang-ML-Lab/bayesian-peft,
``modelwrappers/blob.py``), which is the source of every formula below.

**The posterior.** A LoRA layer ``W = W0 + s B A`` (``s = alpha / r``, peft's layer) whose ``A (r, in)`` is
Gaussian, ``q(A) = N(M, diag(sigma^2))``, ``B (out, r)`` deterministic. ``M`` is peft's ``lora_A`` weight;
``sigma`` comes from a parameter ``rho`` of the same shape (:class:`BlobPosterior`): ``sigma = rho^2`` for
``eps > 0`` (``rho`` drawn from ``U(eps / sqrt 2, eps)``), ``sigma = softplus(rho)`` for ``eps < 0`` (``rho``
from ``U(eps - 1, eps)``).

**Sampling (flipout).** A sampled forward adds to the layer's output, for input rows ``x`` (any leading
shape, last dim ``in``), ``s ((x * r_A) (sigma * E)^T * s_A) B^T`` with ``E ~ N(0, 1)`` drawn once per
forward for the whole ``(r, in)`` weight and Rademacher sign vectors ``r_A`` (``in``) and ``s_A`` (``r``)
drawn per row, so rows of a batch see decorrelated perturbations of the one draw (Wen et al. 2018). The
mean path is peft's own ``s B M x``. A layer samples while its posterior module is in train mode: the
trainer's and the sampling predictive's adapter-noise switch (``polar_vbll.adapters.dropout``) turns it
on, so one-pass features (validation, the frozen-prefix cache) use the mean.

**The KL** to the prior ``N(0, beta^2)`` per entry of ``A``, summed (float64), with the reference code's
stabilising ``eps' = 1e-6``::

    KL = sum log(beta + eps') - log(sigma + eps') + (sigma^2 + M^2) / (2 beta^2 + eps') - 1/2

**Training** (the reference's two optimizers, :meth:`BlobAdapter.variational_step`): the data term (the
head's loss on sampled features) is back-propagated once; the run's AdamW steps ``M`` and ``B`` on it; then
plain SGD with learning rate ``kl_lr`` (scaled by the run's warmup/decay factor) steps ``M`` on the weighted
KL's gradient and ``rho`` on its data gradient plus the weighted KL's gradient. Step ``i``'s KL weight
(1-based, cycling with period ``M_kl``) is ``pi_i = 2^i / (2^(M_kl + 1) - 1)`` with KL re-weighting, else
``1 / M_kl``; ``M_kl = int(100 N^(pi / gamma) / batch size)`` with data-set rescaling (``N`` training
examples), else the steps of an epoch.

**Prediction**: ``eval_samples`` sampled passes averaged in probability space (the ``blob`` predictive,
``polar_vbll.predictives.predict_sampled``).

Saved as peft's LoRA files (``M`` as ``lora_A``, so the directory is also a PEFT adapter of the posterior
mean) plus ``blob_posterior.safetensors`` (``rho`` per layer) and ``blob_config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polar_vbll.adapters.config import (
    BlobConfig,
    PolarBlobConfig,
    blob_config_from_dict,
    polar_blob_config_from_dict,
)
from polar_vbll.adapters.dropout import seeded_rng
from polar_vbll.adapters.lora import ADAPTER_NAME, LoraAdapter
from polar_vbll.adapters.model import PolarModel
from polar_vbll.adapters.state import read_safetensors
from polar_vbll.checkpoint import sha256_file
from polar_vbll.errors import CheckpointError

#: BLoB's side files in a saved adapter directory.
BLOB_CONFIG_NAME = "blob_config.json"
BLOB_POSTERIOR_NAME = "blob_posterior.safetensors"
#: The reference code's stabilising constant inside the KL's logs and denominator.
KL_EPS = 1e-6
#: The attribute of a peft LoRA layer holding its :class:`BlobPosterior` (not ``lora_*``: peft would save it).
POSTERIOR_ATTR = "blob_posterior"


class BlobPosterior(nn.Module):
    """The std parameter ``rho (r, in)`` of one layer's ``q(A)``; in train mode the layer samples.

    ``forward(x, B, scaling)`` is the flipout perturbation (module docstring): ``x (..., in)``, ``B (out, r)``
    to ``(..., out)`` in ``x``'s dtype. ``basis`` (None, or an orthogonal ``(r, r)`` buffer ``V``): the posterior
    is on ``V^T A`` rather than ``A`` (TFB's SVD basis of ``B``, ``polar_vbll.tfb``), so the noise enters
    through ``B V``."""

    #: sampling is this module's train mode: the adapter-noise switch counts it as active
    samples_in_train_mode = True

    def __init__(self, r: int, in_features: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.eps = eps
        rho = torch.empty(r, in_features, dtype=dtype, device=device)
        low, high = (eps / math.sqrt(2), eps) if eps > 0 else (eps - 1.0, eps)
        self.rho = nn.Parameter(rho.uniform_(low, high))
        self.register_buffer("basis", None, persistent=False)
        self.train(False)

    def sigma(self) -> torch.Tensor:
        """``sigma (r, in)``: ``rho^2`` (``eps > 0``) or ``softplus(rho)``."""
        return self.rho**2 if self.eps > 0 else nn.functional.softplus(self.rho)

    def forward(self, x: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        sigma = self.sigma()
        x = x.to(sigma.dtype)
        r_a = torch.empty(*x.shape[:-1], sigma.shape[1], dtype=x.dtype, device=x.device).bernoulli_(0.5) * 2 - 1
        s_a = torch.empty(*x.shape[:-1], sigma.shape[0], dtype=x.dtype, device=x.device).bernoulli_(0.5) * 2 - 1
        noise = sigma * torch.randn_like(sigma)
        b = b.to(sigma.dtype) if self.basis is None else b.to(sigma.dtype) @ self.basis.to(sigma.dtype)
        return ((((x * r_a) @ noise.T) * s_a) @ b.T) * scaling


def kl_divergence(mean: torch.Tensor, sigma: torch.Tensor, beta: float) -> torch.Tensor:
    """``KL(N(mean, sigma^2) || N(0, beta^2))`` summed over entries, in float64, with the reference code's
    ``eps' = 1e-6`` (module docstring). ``mean``, ``sigma``: same shape; differentiable in both."""
    m, s = mean.to(torch.float64), sigma.to(torch.float64)
    kl = math.log(beta + KL_EPS) - torch.log(s + KL_EPS) + (s**2 + m**2) / (2 * beta**2 + KL_EPS) - 0.5
    return kl.sum()


def kl_weight(step: int, period: int, reweighting: bool) -> float:
    """The KL weight of 0-based training step ``step``: ``2^i / (2^(period + 1) - 1)`` with ``i`` the 1-based
    step cycled into ``1..period`` (re-weighting; the weights of a cycle sum to just under 1), else
    ``1 / period``. Exact in Python integers before the one division."""
    if period < 1:
        raise ValueError(f"the KL period must be >= 1, got {period}")
    if not reweighting:
        return 1.0 / period
    i = (step + 1) % period or period
    return 2**i / (2 ** (period + 1) - 1)


def kl_period(cfg: BlobConfig, n_train: int, batch_size: int) -> int:
    """``M_kl``: ``int(100 N^(pi / gamma) / batch size)`` with data-set rescaling (at least 1), else the steps
    of an epoch ``ceil(N / batch size)``."""
    if cfg.dataset_rescaling:
        return max(1, int(100 * n_train ** (math.pi / cfg.gamma) / batch_size))
    return max(1, math.ceil(n_train / batch_size))


class _BlobTraining:
    """BLoB's training on any adapter whose :meth:`posteriors` lists ``(path, BlobPosterior, mean)`` per layer
    and whose ``blob_settings`` holds the :class:`~polar_vbll.adapters.config.BlobSettings`: the KL and the
    second optimizer's step (the trainer's hook after the theta step)."""

    def posteriors(self) -> list[tuple[str, BlobPosterior, nn.Parameter]]:
        raise NotImplementedError

    def posterior_parameters(self) -> list[nn.Parameter]:
        """Every layer's ``rho``: stepped by BLoB's SGD only (:meth:`variational_step`), never by AdamW."""
        return [p.rho for _, p, _ in self.posteriors()]

    def kl_divergence(self) -> torch.Tensor:
        """``KL(q || p)`` over every layer's Bayesian factor (float64 scalar, differentiable in its mean and
        ``rho``)."""
        beta = self.blob_settings.beta
        total = torch.zeros((), dtype=torch.float64)
        for _, p, a in self.posteriors():
            total = total + kl_divergence(a, p.sigma(), beta)
        return total

    def variational_step(self, step: int, lr_factor: float, n_train: int, batch_size: int) -> dict[str, float]:
        """BLoB's second optimizer, after the theta step of 0-based ``step`` (module docstring): SGD with
        learning rate ``kl_lr * lr_factor`` on ``M`` (the weighted KL's gradient) and ``rho`` (its data
        gradient, left by the step's backward, plus the weighted KL's). Returns ``{"kl", "kl_weight"}``."""
        cfg = self.blob_settings
        pi = kl_weight(step, kl_period(cfg, n_train, batch_size), cfg.kl_reweighting)
        means = [a for _, _, a in self.posteriors()]
        rhos = self.posterior_parameters()
        kl = self.kl_divergence()
        grads = torch.autograd.grad(kl * pi, [*means, *rhos])
        lr = cfg.kl_lr * lr_factor
        with torch.no_grad():
            for a, g in zip(means, grads[: len(means)], strict=True):
                a.sub_(lr * g.to(a.dtype))
            for r, g in zip(rhos, grads[len(means) :], strict=True):
                total = g.to(r.dtype) if r.grad is None else g.to(r.dtype) + r.grad
                r.sub_(lr * total)
        for r in rhos:
            r.grad = None
        return {"kl": float(kl.detach()), "kl_weight": pi}



class BlobAdapter(_BlobTraining, LoraAdapter):
    """A :class:`LoraAdapter` whose ``A`` has BLoB's Gaussian posterior (module docstring). Beyond LoRA's
    interface: :meth:`posterior_parameters` (``rho``), :meth:`kl_divergence` and :meth:`variational_step`
    (the trainer's hook after the theta step)."""

    CONFIG_NAME = BLOB_CONFIG_NAME
    ADAPTER_TYPE = "blob"
    parse_config = staticmethod(blob_config_from_dict)

    def __init__(self, model: nn.Module, config: BlobConfig | dict[str, Any]) -> None:
        super().__init__(model, config)
        cfg: BlobConfig = self.lora_config
        with seeded_rng(cfg.init_seed + 1):  # rho's draw: reproducible, apart from A's
            attach_posteriors(self, cfg.eps)
        self.train(self.training)

    @property
    def blob_settings(self) -> BlobConfig:
        return self.lora_config

    def posteriors(self) -> list[tuple[str, BlobPosterior, nn.Parameter]]:
        """``(path, posterior, A's mean)`` per adapted layer, sorted by path."""
        return [(n, getattr(m, POSTERIOR_ATTR), m.lora_A[ADAPTER_NAME].weight) for n, m in self.lora_layers()]

    # ------------------------------------------------------------------------------------- state dicts
    def _adapter_params(self) -> dict[str, nn.Parameter]:
        out = super()._adapter_params()
        for n, p, _ in self.posteriors():
            out[f"base_model.model.{n}.{POSTERIOR_ATTR}.rho"] = p.rho
        return out

    def export_peft_lora(self, directory) -> Path:
        """A standard PEFT LoRA adapter of the posterior mean (``lora_A`` = ``M``; ``sigma`` is not a PEFT
        notion and is left out): peft's two files only. Refused as LoRA's is (no module, or the LM head)."""
        from polar_vbll.adapters.model import check_peft_targets

        check_peft_targets(self.base_model, [n for n, _ in self.lora_layers()], f"PEFT export to {directory}")
        return self.save_peft(directory)

    def _save_extra(self, directory: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        tensors = {n: p.rho.detach().contiguous().cpu() for n, p, _ in self.posteriors()}
        save_file(tensors, str(directory / BLOB_POSTERIOR_NAME))
        return {"posterior_sha256": sha256_file(directory / BLOB_POSTERIOR_NAME)}

    @classmethod
    def _load_extra(cls, directory: Path, meta: dict[str, Any], config, targets) -> tuple[dict, dict]:
        path = directory / BLOB_POSTERIOR_NAME
        if not path.is_file():
            raise CheckpointError(f"BLoB posterior {path} does not exist")
        if sha256_file(path) != meta.get("posterior_sha256"):
            raise CheckpointError(f"BLoB posterior {path} is truncated or altered (sha256 does not match)")
        raw = read_safetensors(path, "BLoB posterior")
        key = f"base_model.model.{{}}.{POSTERIOR_ATTR}.rho"
        tensors = {key.format(n): t for n, t in raw.items()}
        shapes = {key.format(t.name): (config.r, t.in_features) for t in targets}
        return tensors, shapes


def attach_posteriors(adapter: LoraAdapter, eps: float) -> list[BlobPosterior]:
    """Give every LoRA layer of ``adapter`` a :class:`BlobPosterior` (``rho`` drawn as ``eps`` says) and the
    forward hook that samples while it is in train mode; a layer that has one keeps it. Returns them in
    path order. Used by BLoB (trained posterior) and TFB (``polar_vbll.tfb``: a posterior set post hoc)."""
    out = []
    for _, layer in adapter.lora_layers():
        post = getattr(layer, POSTERIOR_ATTR, None)
        if post is None:
            a = layer.lora_A[ADAPTER_NAME].weight
            post = BlobPosterior(a.shape[0], a.shape[1], eps, torch.float32, a.device)
            layer.add_module(POSTERIOR_ATTR, post)
            layer.register_forward_hook(_sample_hook)
        out.append(post)
    return out


def _sample_hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """A peft LoRA layer's forward hook: while its posterior samples, add the flipout perturbation."""
    post: BlobPosterior = getattr(layer, POSTERIOR_ATTR)
    if not post.training or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    x = layer.lora_dropout[ADAPTER_NAME](args[0])
    b = layer.lora_B[ADAPTER_NAME].weight
    return output + post(x, b, layer.scaling[ADAPTER_NAME]).to(output.dtype)


class PolarBlobAdapter(_BlobTraining, PolarModel):
    """PoLAR-BLoB: a :class:`~polar_vbll.adapters.model.PolarModel` whose ``r x r`` core ``Theta`` has BLoB's
    Gaussian posterior ``N(Theta, sigma^2)`` (U, V stay points on the Stiefel manifold, stepped as PoLAR's).
    BLoB puts its posterior on LoRA's ``A``, the factor that reads the input; PoLAR's input factor ``V`` lives
    on a manifold where an entrywise Gaussian is not a distribution, so the posterior goes on the one
    Euclidean factor, ``Theta``: the noise enters as ``s U (sigma * E) V^T x`` with BLoB's flipout signs on the
    ``r``-dimensional ``V^T x`` and on the output of the noise; the KL, weights and second optimizer as BLoB's.
    Saved with the adapter's weights (``rho`` beside each ``polar_theta``)."""

    ADAPTER_TYPE = "polar_blob"
    parse_config = staticmethod(polar_blob_config_from_dict)

    def __init__(self, model: nn.Module, config: PolarBlobConfig | dict[str, Any]) -> None:
        super().__init__(model, config)
        cfg: PolarBlobConfig = self.polar_config
        with seeded_rng(cfg.init_seed + 1):
            for _, layer in self.polar_layers():
                theta = layer.polar_theta
                post = BlobPosterior(cfg.r, cfg.r, cfg.eps, torch.float32, theta.device)
                post.train(layer.training)  # the backbone's mode: sampling only when the noise switch says so
                layer.add_module(POSTERIOR_ATTR, post)
                layer.register_forward_hook(_polar_sample_hook)

    @property
    def blob_settings(self) -> PolarBlobConfig:
        return self.polar_config

    def posteriors(self) -> list[tuple[str, BlobPosterior, nn.Parameter]]:
        """``(path, posterior, Theta)`` per adapted layer, sorted by path."""
        return [(n, getattr(m, POSTERIOR_ATTR), m.polar_theta) for n, m in self.polar_layers()]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict()
        out.update({f"base_model.{n}.{POSTERIOR_ATTR}.rho": p.rho.detach().clone() for n, p, _ in self.posteriors()})
        return out

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        out = super()._adapter_params()
        out.update({f"base_model.{n}.{POSTERIOR_ATTR}.rho": p.rho for n, p, _ in self.posteriors()})
        return out

    @classmethod
    def _extra_shapes(cls, targets, config) -> dict[str, tuple[int, ...]]:
        return {f"base_model.{t.name}.{POSTERIOR_ATTR}.rho": (config.r, config.r) for t in targets}


def _polar_sample_hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """A ``PolarLinear``'s forward hook: while its posterior samples, add the flipout perturbation of Theta,
    ``s U (noise) V^T x`` (the input read through ``V`` first: ``r`` numbers per row)."""
    post: BlobPosterior = getattr(layer, POSTERIOR_ATTR)
    if not post.training or layer.merged:
        return None
    hv = nn.functional.linear(layer.polar_dropout(args[0]).to(torch.float32), layer.V.T.contiguous())
    return output + post(hv, layer.U, layer.scaling).to(output.dtype)


def inject_blob(model: nn.Module, config: BlobConfig | dict[str, Any]) -> BlobAdapter:
    """Inject BLoB into ``model`` in place and return the wrapping :class:`BlobAdapter`."""
    return BlobAdapter(model, config)
