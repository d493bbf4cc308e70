"""PoLAR adapters: injection, forward math, the Stiefel bank, merge, save/load, PEFT export, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from polar_vbll.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    FORMAT_VERSION,
    PolarConfig,
    PolarLinear,
    PolarModel,
    StiefelBank,
    inject_polar,
    polar_config_from_dict,
    stable_rank,
)
from polar_vbll.adapters.state import config_digest
from polar_vbll.errors import CheckpointError, ConfigError, UserInputError
from polar_vbll.manifold import random_stiefel

from .conftest import make_tiny_llama

R = 8


def _ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _randomize_thetas(pm: PolarModel, seed: int = 3, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.theta_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _perturb_bank(pm: PolarModel, seed: int = 11) -> None:
    """Move every factor to another orthonormal point, as training would (so loading must restore it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.polar_bank.groups():
            p.copy_(random_stiefel(p.shape[0], n=p.shape[1], r=p.shape[2], generator=g))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _q_proj(pm: PolarModel, block: int = 0) -> PolarLinear:
    layer = pm.base_model.get_submodule(f"model.layers.{block}.self_attn.q_proj")
    assert isinstance(layer, PolarLinear)
    return layer


# ------------------------------------------------------------------------------------------------ init
def test_init_is_orthonormal_zero_theta_and_leaves_outputs_unchanged(tiny_llama):
    ids = _ids()
    before = _logits(tiny_llama, ids)
    pm = inject_polar(tiny_llama, PolarConfig(r=R))

    assert pm.orthogonality_error() < 1e-5
    assert all(torch.count_nonzero(t) == 0 for t in pm.theta_parameters())
    assert len(pm.theta_parameters()) == 2 * 5  # 2 blocks x {q, k, v, up, down}
    torch.testing.assert_close(_logits(pm, ids), before, rtol=0, atol=1e-6)
    assert all(v == 0.0 for v in pm.stable_ranks().values())


def test_injection_is_deterministic_in_init_seed():
    a = inject_polar(make_tiny_llama(), PolarConfig(r=R, init_seed=5))
    b = inject_polar(make_tiny_llama(), PolarConfig(r=R, init_seed=5))
    c = inject_polar(make_tiny_llama(), PolarConfig(r=R, init_seed=6))
    for (ka, pa), (kb, pb), (_, pc) in zip(
        a.polar_bank.groups(), b.polar_bank.groups(), c.polar_bank.groups(), strict=True
    ):
        assert ka == kb
        assert torch.equal(pa, pb)
        assert not torch.allclose(pa, pc)


# --------------------------------------------------------------------------------------------- forward
def test_forward_matches_float64_reference(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R, alpha=16.0))
    _randomize_thetas(pm)
    layer = _q_proj(pm)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))

    d = torch.float64
    w0 = layer.base_layer.weight.to(d)
    u, v, theta = layer.U.detach().to(d), layer.V.detach().to(d), layer.polar_theta.detach().to(d)
    s = 16.0 / R
    ref = x.to(d) @ w0.T + s * (x.to(d) @ v @ theta.T @ u.T)
    if layer.base_layer.bias is not None:
        ref = ref + layer.base_layer.bias.to(d)

    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.to(d), ref, rtol=1e-5, atol=1e-5)
    # The reference differs from the base output, so the check is not vacuous.
    assert (ref - x.to(d) @ w0.T).abs().max() > 1e-3
    torch.testing.assert_close(layer.delta_weight().to(d), s * u @ theta @ v.T, rtol=1e-5, atol=1e-6)


def test_gradients_reach_bank_and_thetas_only(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    _randomize_thetas(pm)  # with Theta = 0 the factors' gradients are exactly zero
    pm.train()
    pm(input_ids=_ids()).logits.pow(2).mean().backward()

    for p in pm.stiefel_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in pm.theta_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    adapter_ids = {id(p) for p in pm.stiefel_parameters() + pm.theta_parameters()}
    for name, p in pm.named_parameters():
        if id(p) not in adapter_ids:
            assert not p.requires_grad and p.grad is None, name
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("polar_" in n for n in trainable)


# ------------------------------------------------------------------------------------------------ bank
def test_bank_groups_by_shape_and_factors_are_views(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    bank = pm.polar_bank
    q = _q_proj(pm)
    u_key, u_idx = bank.slots[q.u_slot]
    v_key, _ = bank.slots[q.v_slot]
    assert u_key == v_key == f"n64_r{R}"  # q_proj is 64 x 64: U and V share one group tensor
    group = dict(bank.groups())[u_key]
    assert isinstance(group, nn.Parameter) and group.dtype == torch.float32 and group.is_contiguous()
    assert q.U.untyped_storage().data_ptr() == group.untyped_storage().data_ptr()

    shapes = set()
    for _, m in pm.polar_layers():
        shapes |= {(m.out_features, R), (m.in_features, R)}
    assert len(list(bank.groups())) == len(shapes) == 3  # n = 64, 32 (k/v), 128 (up out, down in)
    assert sum(p.shape[0] for p in pm.stiefel_parameters()) == len(bank) == 2 * 10

    # Modifying the group tensor (at U's index only: flipping U and V together would cancel) changes
    # what the layer computes.
    _randomize_thetas(pm)
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = q(x)
        group[u_idx].mul_(-1.0)
        after = q(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after - q.base_layer(x), -(before - q.base_layer(x)))


def test_a_group_gradient_arrives_once_per_backward_and_equals_the_per_factor_gradient():
    """The unbind fix (issue #14, item 6): every factor of a group read in one forward feeds ONE gradient
    into the group (counted as the autograd nodes feeding the group's AccumulateGrad; with ``group[idx]``
    each factor's SelectBackward fed it a zero-padded full ``(G, n, r)`` gradient), equal in float64 to the
    gradient through plain per-factor indexing, including across two forwards before one backward, after
    an in-place step, and after ``p.data`` is replaced."""
    from polar_vbll.adapters.bank import StiefelBank

    g = torch.Generator().manual_seed(0)
    names = [f"f{i}" for i in range(7)]
    bank = StiefelBank.build([(n, 9, 3) for n in names], generator=g)
    group = bank.polar_groups["n9_r3"]
    weights = torch.randn(len(names), 9, 3, generator=g)

    def loss(read) -> torch.Tensor:
        return sum((read(n) * weights[i]).square().sum() for i, n in enumerate(names))

    def feeders(root: torch.Tensor) -> int:
        """Autograd nodes whose output goes straight into ``group``'s gradient accumulator."""
        seen, stack, found = set(), [root.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for nxt, _ in node.next_functions:
                if nxt is not None and getattr(nxt, "variable", None) is group:
                    found.add(node)
                stack.append(nxt)
        return len(found)

    for change in ("none", "in-place step", "data replaced"):
        if change == "in-place step":
            with torch.no_grad():
                group.mul_(1.5)
        elif change == "data replaced":
            group.data = group.data.clone() * 0.5
        reference = group.detach().double().requires_grad_(True)
        expected = torch.autograd.grad(2 * loss(lambda n, r=reference: r[bank.slots[n][1]]), reference)[0]
        group.grad = None
        total = loss(bank.factor) + loss(bank.factor)  # two forwards (micro-batches), one backward
        assert feeders(total) == 1, change
        total.backward()
        torch.testing.assert_close(group.grad.double(), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert bank.factor("f3").grad_fn is None and torch.equal(bank.factor("f3"), group[3])
    clone = copy.deepcopy(bank)  # the cached views are not copied (they belong to this bank's graph)
    assert torch.equal(clone.factor("f2"), bank.factor("f2")) and clone.factor("f2").data_ptr() != group[2].data_ptr()


def test_bank_is_not_a_submodule_of_the_base_model(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    names = [n for n, _ in pm.base_model.named_parameters()]
    assert any(n.endswith("polar_theta") for n in names)
    assert not any("polar_groups" in n for n in names)
    assert not any(isinstance(m, StiefelBank) for m in pm.base_model.modules())
    bank_ids = {id(p) for p in pm.stiefel_parameters()}
    assert not bank_ids & {id(p) for p in pm.base_model.parameters()}
    assert not any("polar_groups" in k for k in pm.base_model.state_dict())
    # ...but the wrapper owns it, so .to(device) and the wrapper's state_dict cover it.
    assert any(n.startswith("polar_bank.polar_groups.") for n, _ in pm.named_parameters())


def test_bank_refuses_low_precision(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    w_before = _q_proj(pm).base_layer.weight.clone()
    with pytest.raises(ConfigError, match="float32"):
        pm.to(torch.bfloat16)
    # Refused before anything was converted: the backbone is not left half-cast.
    assert _q_proj(pm).base_layer.weight.dtype == torch.float32
    assert torch.equal(_q_proj(pm).base_layer.weight, w_before)
    with pytest.raises(ConfigError, match="float32"):
        pm.polar_bank.half()
    pm.to("cpu")  # device moves stay allowed
    pm.polar_bank.float()


# ------------------------------------------------------------------------------------------- bf16 base
def test_bf16_backbone_keeps_bank_and_thetas_fp32():
    model = make_tiny_llama().to(torch.bfloat16)
    pm = inject_polar(model, PolarConfig(r=R))
    _randomize_thetas(pm)
    assert all(p.dtype == torch.float32 for p in pm.stiefel_parameters() + pm.theta_parameters())
    logits = pm(input_ids=_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in pm.stiefel_parameters())


# ----------------------------------------------------------------------------------------- merge
def test_merge_matches_unmerged_forward_and_unmerge_restores(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    _randomize_thetas(pm, scale=0.2)
    ids = _ids()
    w0 = {n: m.base_layer.weight.clone() for n, m in pm.polar_layers()}
    unmerged = _logits(pm, ids)

    pm.merge()
    assert all(m.merged for _, m in pm.polar_layers())
    assert any(not torch.allclose(m.base_layer.weight, w0[n]) for n, m in pm.polar_layers())
    torch.testing.assert_close(_logits(pm, ids), unmerged, rtol=1e-5, atol=1e-5)
    pm.merge()  # idempotent: the flag stops a second addition
    torch.testing.assert_close(_logits(pm, ids), unmerged, rtol=1e-5, atol=1e-5)

    pm.unmerge()
    for n, m in pm.polar_layers():
        torch.testing.assert_close(m.base_layer.weight, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(pm, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_unmerge_refuses_after_adapter_changed_while_merged(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    _randomize_thetas(pm)
    pm.merge()
    with torch.no_grad():
        pm.theta_parameters()[0].add_(1.0)
    with pytest.raises(RuntimeError, match="changed while"):
        pm.unmerge()


# ------------------------------------------------------------------------------------------ stable rank
def test_stable_rank_is_computed_from_the_actual_factors(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    _randomize_thetas(pm)
    name, layer = next(iter(pm.polar_layers()))
    sv = torch.linalg.svdvals(layer.polar_theta.detach().double())
    expected_orthonormal = (sv.square().sum() / sv.max().square()).item()
    assert pm.stable_ranks()[name] == pytest.approx(expected_orthonormal, rel=1e-6)
    assert 1.0 <= expected_orthonormal <= R

    # Off the manifold, the stable rank must follow the actual dW, not Theta.
    u = layer.U.detach().clone()
    u[:, 0] *= 5.0
    dw = u.double() @ layer.polar_theta.detach().double() @ layer.V.detach().double().T
    sv_dw = torch.linalg.svdvals(dw)
    honest = (sv_dw.square().sum() / sv_dw.max().square()).item()
    assert stable_rank(u, layer.polar_theta, layer.V) == pytest.approx(honest, rel=1e-6)
    assert honest != pytest.approx(expected_orthonormal, rel=1e-3)


# ------------------------------------------------------------------------------------------- save / load
def _trained(seed: int = 0, **cfg) -> PolarModel:
    pm = inject_polar(make_tiny_llama(seed=seed), PolarConfig(r=R, **cfg))
    _randomize_thetas(pm)
    _perturb_bank(pm)
    return pm


def test_save_load_round_trip_is_exact(tmp_path):
    pm = _trained(alpha=12.0, init_seed=4, layers=[-1])
    ids = _ids()
    expected = _logits(pm, ids)
    pm.save_adapter(tmp_path / "adapter")

    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["format_version"] == FORMAT_VERSION
    assert cfg["polar_config"]["alpha"] == 12.0 and cfg["polar_config"]["layers"] == [-1]
    assert cfg["scaling"] == pytest.approx(12.0 / R)
    assert set(cfg["slots"]) == set(pm.polar_bank.slots)
    assert not list((tmp_path / "adapter").glob("*.tmp"))  # temp files are gone

    loaded = PolarModel.load_adapter(make_tiny_llama(seed=0), tmp_path / "adapter")
    assert loaded.polar_config == pm.polar_config
    assert torch.equal(_logits(loaded, ids), expected)
    for k, v in pm.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v), k
    assert all("polar_" in k for k in pm.adapter_state_dict())


def test_altered_or_truncated_weights_raise_checkpoint_error(tmp_path):
    pm = _trained()
    d = pm.save_adapter(tmp_path / "a")
    weights = d / ADAPTER_WEIGHTS_NAME
    good = weights.read_bytes()

    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0x01
    weights.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match=ADAPTER_WEIGHTS_NAME):
        PolarModel.load_adapter(make_tiny_llama(), d)

    weights.write_bytes(good[: len(good) // 2])
    fresh = make_tiny_llama()
    with pytest.raises(CheckpointError, match="truncated or altered"):
        PolarModel.load_adapter(fresh, d)
    assert not any(isinstance(m, PolarLinear) for m in fresh.modules())  # verified before modifying

    weights.write_bytes(good)
    PolarModel.load_adapter(make_tiny_llama(), d)  # intact again: loads


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PolarModel.load_adapter(make_tiny_llama(), tmp_path / "nowhere")

    d = _trained().save_adapter(tmp_path / "a")
    cfg_path = d / ADAPTER_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="format_version"):
        PolarModel.load_adapter(make_tiny_llama(), d)

    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=ADAPTER_CONFIG_NAME):
        PolarModel.load_adapter(make_tiny_llama(), d)

    bad = {**cfg, "polar_config": {**cfg["polar_config"], "r": 0}}
    cfg_path.write_text(json.dumps(bad))  # an edit: caught by the content hash before anything else
    with pytest.raises(CheckpointError, match="altered after it was written"):
        PolarModel.load_adapter(make_tiny_llama(), d)
    cfg_path.write_text(json.dumps({**bad, "config_sha256": config_digest(bad)}))  # consistent but invalid
    with pytest.raises(ConfigError, match=ADAPTER_CONFIG_NAME):
        PolarModel.load_adapter(make_tiny_llama(), d)

    # An adapter saved for a 2-block model does not fit a 3-block one: refused, model untouched.
    cfg_path.write_text(json.dumps(cfg))
    bigger = make_tiny_llama(layers=3)
    with pytest.raises(CheckpointError, match="slot layout"):
        PolarModel.load_adapter(bigger, d)
    assert not any(isinstance(m, PolarLinear) for m in bigger.modules())


def test_an_edited_alpha_is_refused_not_silently_loaded(tmp_path):
    """The kind of fault: a reload that trusts a field the hash does not cover. alpha scales the update
    (W0 + alpha/r U Theta V^T) without touching the weights file, so the hash must cover the config."""
    d = _trained().save_adapter(tmp_path / "a")
    cfg_path = d / ADAPTER_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "polar_config": {**cfg["polar_config"], "alpha": 64.0}}))
    with pytest.raises(CheckpointError, match="altered after it was written"):
        PolarModel.load_adapter(make_tiny_llama(), d)
    cfg_path.write_text(json.dumps(cfg))
    PolarModel.load_adapter(make_tiny_llama(), d)  # intact again: loads


def test_load_adapter_state_dict_is_strict(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    sd = pm.adapter_state_dict()
    key = next(k for k in sd if k.endswith("polar_theta"))

    with pytest.raises(CheckpointError, match="missing keys"):
        pm.load_adapter_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        pm.load_adapter_state_dict({**sd, "polar_extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape"):
        pm.load_adapter_state_dict({**sd, key: torch.zeros(R + 1, R + 1)})
    with pytest.raises(CheckpointError, match="NaN"):
        pm.load_adapter_state_dict({**sd, key: torch.full((R, R), float("nan"))})
    pm.load_adapter_state_dict({**sd, key: torch.ones(R, R)})
    assert torch.equal(dict(pm.named_parameters())[key], torch.ones(R, R))


# ------------------------------------------------------------------------------------------- PEFT export
@pytest.mark.parametrize("cfg", [{}, {"layers": [-1], "target_modules": ["q_proj", "down_proj"], "r": 4}])
def test_peft_export_loads_in_peft_with_identical_logits(tmp_path, cfg):
    peft = pytest.importorskip("peft")
    kwargs = {"r": R, **cfg}
    pm = inject_polar(make_tiny_llama(seed=0), PolarConfig(**kwargs))
    _randomize_thetas(pm, scale=0.3)
    _perturb_bank(pm)
    ids = _ids()
    ours = _logits(pm, ids)
    assert (ours - _logits(make_tiny_llama(seed=0), ids)).abs().max() > 1e-3  # the adapter does something

    d = pm.export_peft_lora(tmp_path / "lora")
    cfg_json = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    assert cfg_json["peft_type"] == "LORA" and cfg_json["lora_alpha"] == pm.polar_config.alpha
    peft_model = peft.PeftModel.from_pretrained(make_tiny_llama(seed=0), str(d))
    peft_model.eval()
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(list(pm.polar_layers()))
    torch.testing.assert_close(_logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- user errors
def test_unknown_target_module_lists_available_names(tiny_llama):
    with pytest.raises(UserInputError) as exc:
        inject_polar(tiny_llama, PolarConfig(target_modules=["q_proj", "nonexistent"]))
    msg = str(exc.value)
    assert "nonexistent" in msg
    for name in ("q_proj", "o_proj", "gate_proj", "lm_head"):
        assert name in msg
    assert msg.count("'q_proj'") == 1  # available names are deduplicated by last component
    assert not any(isinstance(m, PolarLinear) for m in tiny_llama.modules())


def test_rank_too_large_names_the_layer(tiny_llama):
    with pytest.raises(ConfigError, match=r"model\.layers\.0\..*shape \(out=\d+, in=\d+\)"):
        inject_polar(tiny_llama, PolarConfig(r=1000))
    # k_proj is 32 x 64: r = 40 fits q_proj (64 x 64) but not k_proj.
    with pytest.raises(ConfigError, match=r"k_proj.*out=32, in=64"):
        inject_polar(tiny_llama, PolarConfig(r=40, target_modules=["q_proj", "k_proj"]))


def test_layers_out_of_range_raises(tiny_llama):
    with pytest.raises(ConfigError, match=r"\[5\].*2 blocks"):
        inject_polar(tiny_llama, PolarConfig(layers=[5]))
    with pytest.raises(ConfigError, match=r"\[-3\]"):
        inject_polar(tiny_llama, PolarConfig(layers=[-3]))


def test_negative_layer_adapts_only_the_last_block(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R, layers=[-1]))
    names = [n for n, _ in pm.polar_layers()]
    assert len(names) == 5 and all(n.startswith("model.layers.1.") for n in names)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not isinstance(tiny_llama.model.layers[0].self_attn.q_proj, PolarLinear)


def test_config_validation():
    assert PolarConfig().scaling == 32.0 / 8
    for bad in (
        {"r": 0},
        {"alpha": float("inf")},
        {"alpha": 0},
        {"dropout": 1.0},
        {"layers": []},
        {"target_modules": []},
        {"target_modules": ["q_proj", "q_proj"]},
        {"rank": 8},
        {"r": True},
    ):
        with pytest.raises(ConfigError, match="test.yaml"):
            polar_config_from_dict(bad, "test.yaml")
    assert polar_config_from_dict({"r": 4, "layers": [-2, -1]}, "x").layers == [-2, -1]


def test_injecting_twice_is_refused(tiny_llama):
    inject_polar(tiny_llama, PolarConfig(r=R))
    with pytest.raises(UserInputError, match="already contains"):
        inject_polar(tiny_llama, PolarConfig(r=R))


def test_deepcopy_keeps_layers_reading_their_own_bank(tiny_llama):
    pm = inject_polar(tiny_llama, PolarConfig(r=R))
    twin = copy.deepcopy(pm)
    assert all(m.bank is twin.polar_bank for _, m in twin.polar_layers())
    assert all(m.bank is pm.polar_bank for _, m in pm.polar_layers())
