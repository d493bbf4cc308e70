"""Devices: ``model.device`` resolved once (``polar_vbll.placement``), honoured by every command, and every
tensor of a training step, an evaluation and a prediction on the backbone's device.

No GPU is needed: the device-consistency tests run the product's own code on a stand-in accelerator
(``tests/fake_accelerator.py``) that refuses, as CUDA does, any op mixing its tensors with CPU tensors and
records every host read of a device value (a sync). The same run on the CPU is the reference: the numbers
must agree, so the device path is the same computation, not another one.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from typer.testing import CliRunner

from polar_vbll import placement as placement_mod
from polar_vbll.config import ModelConfig, load_config, resolve_config
from polar_vbll.errors import ConfigError
from polar_vbll.placement import Placement, placement_for, resolve_device, resolve_dtype, resolved
from polar_vbll_cli.app import app
from tests.fake_accelerator import ACCELERATOR, DeviceMismatch, FakeAccelerator

runner = CliRunner()


# ------------------------------------------------------------------------------------------ resolution
def test_auto_picks_the_cpu_on_a_machine_without_cuda():
    assert not torch.cuda.is_available()
    p = placement_for(ModelConfig())
    assert p.device == torch.device("cpu") and p.dtype == "float32"
    assert p.describe()["device"] == "cpu" and p.describe()["adapter_dtype"] == "float32"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_request_without_cuda_is_refused_naming_what_to_set(spec):
    with pytest.raises(ConfigError, match=rf"model.device={spec}, but .*; use model.device=cpu"):
        resolve_device(spec)


def test_auto_and_explicit_devices_on_a_machine_with_two_gpus(monkeypatch):
    """The rules, with torch's CUDA queries answered as a 2-GPU machine would (one of them pre-Ampere)."""
    monkeypatch.setattr(placement_mod, "cuda_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0) if d.index == 0 else (7, 0))
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"sees 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"  # H100: bf16 natively
    assert resolve_dtype("auto", torch.device("cuda", 1)) == "float32"  # V100: no bf16
    assert resolve_dtype("float32", torch.device("cuda", 0)) == "float32"  # asked for: kept
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"


def test_a_device_name_is_checked_when_the_config_is_parsed():
    with pytest.raises(ConfigError, match=r"model.device: not a device; use auto, cpu, cuda or cuda:N \(got 'gpu'\)"):
        load_config(resolve_config("tiny"), ["model.device=gpu"])


def test_a_run_records_the_dtype_auto_resolved_to():
    cfg = load_config(resolve_config("tiny"))
    assert cfg.model.dtype == "auto" and cfg.model.device == "auto"
    r = resolved(cfg)
    assert r.model.dtype == "float32" and r.model.device == "auto"  # where it ran is recorded apart
    bf = resolved(cfg, Placement(torch.device("cuda", 0), "bfloat16"))
    assert bf.model.dtype == "bfloat16"


# ---------------------------------------------------------------------------------------- the commands
def _cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-runs")
    result = _cli("train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={out}",
                  "--set", "model.device=cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "tiny"


def test_train_on_the_cpu_records_the_device_and_dtype(cpu_run):
    params = json.loads((cpu_run / "params.json").read_text())
    assert params["model.device"] == "cpu" and params["model.dtype"] == "float32"
    assert params["placement.device"] == "cpu" and params["placement.dtype"] == "float32"
    results = json.loads((cpu_run / "results.json").read_text())
    assert results["placement"]["device"] == "cpu" and results["placement"]["dtype"] == "float32"
    assert results["params"]["model.dtype"] == "float32"


def test_eval_calibrate_and_predict_on_the_cpu(cpu_run, tmp_path):
    ev = _cli("eval", str(cpu_run), "--device", "cpu", "--no-progress")
    assert ev.exit_code == 0, ev.output
    recorded = json.loads((cpu_run / "results.json").read_text())["metrics"]["eval"]["acc"]
    assert json.loads(ev.output[ev.output.index("{"):])["eval"]["acc"] == pytest.approx(recorded)
    cal = _cli("calibrate", str(cpu_run), "--device", "cpu", "--risk", "0.5", "--no-progress")
    assert cal.exit_code == 0, cal.output
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Which is a colour?", "choices": ["red", "dog", "run"]}) + "\n")
    pr = _cli("predict", str(cpu_run), "-i", str(q), "-o", str(tmp_path / "d.jsonl"), "--device", "cpu",
              "--no-progress")  # fmt: skip
    assert pr.exit_code == 0, pr.output
    assert json.loads((tmp_path / "d.jsonl").read_text())["decision"] in ("answer", "abstain", "escalate")


def test_compare_on_the_cpu(tmp_path):
    result = _cli("compare", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path}",
                  "--set", "tasks=[arc_easy]", "--set", "seeds=[0]", "--set", "methods=[polar_mle]",
                  "--set", "ood=null", "--set", "base.model.device=cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "compare-tiny" / "arc_easy" / "polar_mle" / "seed0" / "results.json").read_text())
    assert res["placement"]["device"] == "cpu" and res["params"]["model.device"] == "cpu"


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--config", "tiny", "--set", "model.device=cuda"],
        ["train", "--config", "tiny", "--set", "model.device=cuda:1", "--set", "method=polar_vbll"],
        ["compare", "--config", "tiny", "--set", "base.model.device=cuda"],
    ],
    ids=["train", "train-cuda1", "compare"],
)
def test_a_cuda_request_on_this_machine_is_one_line_and_exit_2_before_any_work(command, tmp_path):
    result = _cli(*command, "--no-progress", "--no-track", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.device=cuda"), result.output
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", ["eval", "calibrate", "predict"])
def test_a_cuda_device_for_a_saved_run_is_one_line_and_exit_2(command, cpu_run, tmp_path):
    before = sorted(p.name for p in cpu_run.iterdir())
    extra = ["-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "d.jsonl")] if command == "predict" else []
    result = _cli(command, str(cpu_run), *extra, "--device", "cuda", "--no-progress")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.device=cuda"), result.output
    assert sorted(p.name for p in cpu_run.iterdir()) == before and not (tmp_path / "d.jsonl").exists()


# ----------------------------------------------------------------------------- device consistency
def _session_on(device_cfg, acc: bool):
    """A tiny session built by the product's ``build_session`` with the backbone on the stand-in
    accelerator (``acc``) or the CPU; the model is loaded on the CPU first (outside the mode)."""
    from polar_vbll.models import load_backbone
    from polar_vbll.session import build_session

    cpu = Placement(torch.device("cpu"), "float32")
    model, tok = load_backbone(device_cfg.model, cpu)
    where = Placement(ACCELERATOR, "float32") if acc else cpu
    return build_session(device_cfg, load=lambda _m, _p: (model.to(where.device), tok), placement=where)


def _train_and_evaluate(cfg, acc: bool, mode: FakeAccelerator | None):
    """Three steps (the first synced, the others not, as on a GPU between logging steps), the evaluation
    and the zero-shot predictions, through the same objects every entry point builds."""
    from polar_vbll.evaluation import Member, evaluate
    from polar_vbll.predictives import predict
    from polar_vbll.runner import local_backend
    from polar_vbll.training import LocalCheckpoints, LocalCoordinator, Trainer

    session = _session_on(cfg, acc)
    backend = local_backend(session)
    assert backend.sync_every_step is (not acc)
    trainer = Trainer(cfg, session.adapter, session.head, session.splits, backend,
                      LocalCoordinator(session.head, cfg.head.fit), LocalCheckpoints(tempfile.mkdtemp(), 1),
                      progress=False)  # fmt: skip
    backend.prepare(session.splits["train"], cfg.train.eval_batch_size)
    trainer.init_joint_head()
    trainer.train_step(sync=True)
    before = len(mode.syncs) if mode is not None else 0
    for _ in range(2):
        trainer.train_step(sync=False)
    step_syncs = mode.our_syncs()[before:] if mode is not None else []
    trainer._check_pending()
    zero = predict(backend, session.zero_shot_head, session.splits["eval"], cfg.train.eval_batch_size, False)
    ev = evaluate(cfg, backend, session.adapter, [Member(session.head)], session.splits, zero.probs, False)
    state = session.adapter.adapter_state_dict()
    adapter = {k: (v.elem if hasattr(v, "elem") else v).clone() for k, v in state.items()}
    return ev, adapter, step_syncs


_SLOW = pytest.mark.slow  # every op goes through Python on the stand-in: the float64 post-hoc fits take a minute
#: (method, cached prefix): every head kind and predictive, both feature paths, in the default suite or slow
CASES = [
    ("polar_vbll", True), ("polar_vbll", False), ("lora_mle", False), ("mc_dropout", True), ("polar_laplace", True),
    pytest.param("polar_mle", True, marks=_SLOW), pytest.param("polar_mle", False, marks=_SLOW),
    pytest.param("lora_mle", True, marks=_SLOW), pytest.param("mc_dropout", False, marks=_SLOW),
    pytest.param("polar_laplace", False, marks=_SLOW), pytest.param("linear_probe", True, marks=_SLOW),
    pytest.param("linear_probe", False, marks=_SLOW),
]  # fmt: skip


@pytest.mark.parametrize(("method", "cached"), CASES)
def test_training_and_evaluation_stay_on_the_device_and_match_the_cpu(method, cached):
    """Every tensor of the step, the head refit hand-over, the post-hoc fits and every predictive on the
    backbone's device (a CPU tensor meeting it raises), no host sync of ours inside an unsynced step,
    and the same numbers as the same run on the CPU."""
    overrides = [f"method={method}", f"train.cache_frozen_prefix={str(cached).lower()}", "train.steps=3",
                 "train.round_steps=2", "head.fit.max_iter=30", "eval.mc_dropout_samples=2"]  # fmt: skip
    if method == "mc_dropout":
        overrides.append("lora.dropout=0.1")
    cfg = resolved(load_config(resolve_config("tiny"), overrides))
    ref, ref_adapter, _ = _train_and_evaluate(cfg, acc=False, mode=None)
    with FakeAccelerator() as mode:
        ev, adapter, step_syncs = _train_and_evaluate(cfg, acc=True, mode=mode)
    assert step_syncs == [], f"host syncs of ours inside unsynced steps: {step_syncs}"
    for k, v in ref_adapter.items():
        torch.testing.assert_close(adapter[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for split, p in ref.predictions.items():
        torch.testing.assert_close(ev.predictions[split].probs, p.probs, rtol=1e-4, atol=1e-5, msg=split)
    assert ev.predictions["eval"].probs.device.type == "cpu"  # what leaves for metrics is on the host


def test_the_stand_in_accelerator_refuses_what_cuda_refuses():
    """The harness itself: a CPU tensor meeting a device tensor raises, 0-dim CPU scalars pass, host reads
    are recorded (so the tests above can fail)."""
    with FakeAccelerator() as mode:
        x = torch.ones(3).to(ACCELERATOR)
        with pytest.raises(DeviceMismatch):
            _ = x + torch.ones(3)
        assert (x * torch.tensor(2.0)).device == ACCELERATOR
        float(x.sum())
    assert len(mode.syncs) == 1 and mode.syncs[0].ours() is False  # read by this test, not by polar_vbll


def test_prediction_from_a_run_folder_stays_on_the_device(cpu_run, monkeypatch):
    """``Predictor.from_run`` with the backbone on the stand-in accelerator: calibration and decisions give
    the CPU's records."""
    from polar_vbll import saved
    from polar_vbll.decisions.rule import RuleSettings
    from polar_vbll.models import load_backbone
    from polar_vbll.predictor import Predictor

    questions = [{"question": "Which is a colour?", "choices": ["red", "dog", "run"], "answer": 0},
                 {"question": "Which one barks?", "choices": ["cat", "dog"], "answer": 1}]  # fmt: skip
    settings = RuleSettings(risk=0.5, delta=0.1, alpha=0.3)

    def records(acc: bool):
        p = Predictor.from_run(cpu_run, need_rule=False, device="cpu")
        p.calibrate(settings)
        return p.predict(questions)

    want = records(acc=False)
    cpu = Placement(torch.device("cpu"), "float32")
    with FakeAccelerator():
        monkeypatch.setattr(saved, "placement_for", lambda m, d=None: Placement(ACCELERATOR, "float32"))
        monkeypatch.setattr(saved, "load_backbone", lambda m, p: (lambda mt: (mt[0].to(ACCELERATOR), mt[1]))(
            load_backbone(m, cpu)))  # fmt: skip
        got = records(acc=True)
    for w, g in zip(want, got, strict=True):
        assert g["decision"] == w["decision"] and g["answer"] == w["answer"]
        assert g["probs"] == pytest.approx(w["probs"], rel=1e-4, abs=1e-6)


def test_the_retraction_falls_back_to_qr_without_a_host_sync_on_a_device():
    """CholQR2's QR fallback (a factor it cannot orthonormalise) is taken without reading the failure mask
    on the host off the CPU, and gives the CPU's factors."""
    from polar_vbll.manifold import orthogonality_error, retract

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 4, generator=g, dtype=torch.float32)
    x[1, :, 3] = x[1, :, 2]  # rank-deficient: CholQR2 fails on this factor, QR takes it
    want = retract(x, "cholqr2")
    with FakeAccelerator() as mode:
        got = retract(x.to(ACCELERATOR), "cholqr2").cpu()
    assert mode.our_syncs() == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(orthogonality_error(got).max()) < 1e-5


def test_train_compile_compiles_every_decoder_block():
    """``train.compile``: every block of the backbone runs through torch.compile (regional compilation)."""
    from polar_vbll.backbone import decoder_of
    from polar_vbll.session import build_session

    cfg = resolved(load_config(resolve_config("tiny"), ["train.compile=true"]))
    session = build_session(cfg)
    blocks = decoder_of(session.model).layers
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    eager = build_session(resolved(load_config(resolve_config("tiny"))))
    assert all(b._compiled_call_impl is None for b in decoder_of(eager.model).layers)


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one(tmp_path):
    """Two PoLAR-VBLL steps with ``train.compile`` give the eager run's losses and adapter (CPU inductor)."""
    from polar_vbll.runner import local_backend
    from polar_vbll.session import build_session
    from polar_vbll.training import LocalCheckpoints, LocalCoordinator, Trainer

    def run(compiled: bool):
        cfg = resolved(load_config(resolve_config("tiny"), ["method=polar_vbll", f"train.compile={compiled}"]))
        s = build_session(cfg)
        t = Trainer(cfg, s.adapter, s.head, s.splits, local_backend(s), LocalCoordinator(s.head, cfg.head.fit),
                    LocalCheckpoints(tmp_path / str(compiled), 1), progress=False)  # fmt: skip
        losses = [t.train_step()["loss"] for _ in range(2)]
        return losses, s.adapter.adapter_state_dict()

    (le, ae), (lc, ac) = run(False), run(True)
    assert lc == pytest.approx(le, rel=1e-4)
    for k in ae:
        torch.testing.assert_close(ac[k], ae[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ workers
@pytest.mark.extras("ray", "deepspeed")
@pytest.mark.parametrize(
    ("device", "use_gpu", "message"),
    [
        ("cuda", False, "model.device=cuda with --workers needs GPU workers: add --dist-set use_gpu=true"),
        ("cpu", True, "model.device=cpu, but --dist-set use_gpu=true asks for GPU workers"),
        ("cuda:1", True, "model.device=cuda:1: with --workers each worker uses its own GPU"),
    ],
)
def test_workers_refuse_a_device_they_cannot_honour_before_ray_starts(device, use_gpu, message, tmp_path):
    extra = ["--dist-set", "use_gpu=true"] if use_gpu else []
    result = _cli("train", "--config", "tiny", "--workers", "2", *extra, "--no-track", "--no-progress",
                  "--set", f"model.device={device}", "--set", f"output_dir={tmp_path}")  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.extras("deepspeed")
def test_the_workers_dtype_is_decided_on_the_driver():
    """``auto`` is bfloat16 for GPU workers and float32 for CPU workers, without asking the driver's CUDA;
    an explicit dtype is kept; the workers' config records it."""
    from distributed.config import DistConfig
    from distributed.devices import driver_config, worker_dtype

    cfg = load_config(resolve_config("tiny"))
    assert worker_dtype(cfg, DistConfig(use_gpu=True)) == "bfloat16"
    assert worker_dtype(cfg, DistConfig(use_gpu=False)) == "float32"
    explicit = load_config(resolve_config("tiny"), ["model.dtype=float32"])
    assert worker_dtype(explicit, DistConfig(use_gpu=True)) == "float32"
    assert driver_config(cfg, DistConfig(use_gpu=True)).model.dtype == "bfloat16"  # no CUDA here: not asked
