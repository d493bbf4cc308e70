"""Shared pieces of the benchmarks in ``bench/``: model building, adapters, one training step, timing and
Markdown tables. Each benchmark script imports this module (it sits next to them, so running
``python bench/<script>.py`` from the repository root finds it) and the library from ``polar_vbll``.

Nothing here changes the library; every measured step goes through the library's own classes
(``LoraAdapter``, ``inject_polar``, ``StiefelOptimizer``, ``VBLLHead``, ``HeadCoordinator``) in the
order ``polar_vbll.training.Trainer.train_step`` uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from anywhere: the working tree's polar_vbll comes first
    sys.path.insert(0, str(REPO_ROOT))

#: Answer-letter token ids of the K=4 classes (any fixed ids work on a random model).
ANSWER_IDS = (10, 11, 12, 13)
NUM_CLASSES = len(ANSWER_IDS)
#: Training-set size N in the VBLL KL weight 1/N (its value does not change the cost).
DATASET_SIZE = 1000
#: PoLAR's reference targets (docs/method.md section 1).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ setup
def set_threads(n: int) -> None:
    """Pin the intra-op thread count (and one inter-op thread) so runs are comparable."""
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)


def common_args(description: str, reps: int = 10, warmup: int = 2) -> argparse.ArgumentParser:
    """The options every CPU benchmark accepts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the shared 2-core VM, 2 threads next to other jobs made "
        "steps 5-15x slower and far noisier; see bench/README.md)",
    )
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions per configuration")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--out", type=Path, default=None, help="folder for <name>.md and <name>.json")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    return p


@dataclass(frozen=True)
class Shape:
    """A Llama shape (random weights)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Shape:
        return cls(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab)

    def describe(self) -> str:
        return (
            f"random Llama: hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
            f"{self.heads} heads / {self.kv_heads} KV heads, vocab {self.vocab}"
        )


#: SmolLM2-135M's block shape (hidden 576, 9 heads, 3 KV heads, vocab 49152), 4 of its 30 blocks.
SMALL = Shape(576, 1536, 4, 9, 3, 49152)
#: The TinyLlama-1.1B shape (the GPU benchmark's model).
TINYLLAMA = Shape(2048, 5632, 22, 32, 4, 32000)


def build_llama(
    shape: Shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> nn.Module:
    """A frozen, eval-mode random ``LlamaForCausalLM``; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def matmul_params(model: nn.Module) -> int:
    """Weights of the decoder blocks' linear layers (the matmul FLOPs of a forward are 2 x this x tokens)."""
    from polar_vbll.backbone import decoder_of

    return sum(m.weight.numel() for m in decoder_of(model).layers.modules() if isinstance(m, nn.Linear))


@dataclass
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    n_choices: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def make_batch(batch: int, seq: int, vocab: int, device: str | torch.device = "cpu", seed: int = 0) -> Batch:
    """Random prompts of exactly ``seq`` tokens (no padding), random labels among K=4 choices."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return Batch(
        ids.to(device),
        torch.ones(batch, seq, dtype=torch.long, device=device),
        labels.to(device),
        torch.full((batch,), NUM_CLASSES, dtype=torch.long, device=device),
    )


# ---------------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class AdapterSpec:
    """``kind``: "lora" (peft) or "polar"; same rank / targets / blocks for both."""

    kind: str
    r: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0


@dataclass(frozen=True)
class OptimSpec:
    """The trainer's defaults (polar_vbll.config.OptimConfig): Riemannian Adam, CholQR2, elementwise."""

    method: str = "riemannian"
    retraction: str = "cholqr2"
    second_moment: str = "elementwise"
    lr: float = 4e-3

    def label(self) -> str:
        return "landing" if self.method == "landing" else f"riemannian/{self.retraction}"


def attach_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Inject the adapter in place; returns the wrapper (``LoraAdapter`` or ``PolarModel``)."""
    layers = list(spec.layers) if spec.layers is not None else None
    if spec.kind == "lora":
        from polar_vbll.adapters import LoraAdapter, LoraConfig

        cfg = LoraConfig(
            r=spec.r, alpha=spec.alpha, target_modules=list(spec.targets), layers=layers, dropout=spec.dropout
        )
        return LoraAdapter(model, cfg)
    if spec.kind == "polar":
        from polar_vbll.adapters import PolarConfig, inject_polar

        cfg = PolarConfig(
            r=spec.r, alpha=spec.alpha, target_modules=list(spec.targets), layers=layers, dropout=spec.dropout
        )
        return inject_polar(model, cfg)
    raise ValueError(f"unknown adapter kind {spec.kind!r}")


def make_head(model: nn.Module, kind: str, predictive: str = "mc", mc_samples: int = 1000) -> nn.Module:
    """``det``: the frozen LM-head rows of the answer tokens; ``vbll``: a diagonal VBLL head started from
    them (its parameters trainable, fp32)."""
    from polar_vbll.backbone import answer_head_weight
    from polar_vbll.heads import DeterministicHead, VBLLHead

    weight, bias = answer_head_weight(model, ANSWER_IDS)
    device = weight.device
    if kind == "det":
        return DeterministicHead(weight, bias).to(device)
    if kind == "vbll":
        cfg = {"predictive": predictive, "mc_samples": mc_samples}
        return VBLLHead.from_weight(weight, DATASET_SIZE, cfg).to(device)
    raise ValueError(f"unknown head kind {kind!r}")


def make_optimizers(
    adapter: nn.Module, opt: OptimSpec
) -> tuple[torch.optim.Optimizer | None, torch.optim.AdamW]:
    """The library's own ``polar_vbll.training.build_optimizers`` (StiefelOptimizer on the bank groups for
    PoLAR, AdamW on Theta or LoRA's A and B), with one learning rate for both."""
    from polar_vbll.config import OptimConfig
    from polar_vbll.training import build_optimizers

    cfg = OptimConfig(
        method=opt.method,
        retraction=opt.retraction,
        second_moment=opt.second_moment,
        lr_stiefel=opt.lr,
        lr_theta=opt.lr,
    )
    return build_optimizers(adapter, cfg)


def no_sync() -> None:
    return None


def cuda_sync() -> None:
    torch.cuda.synchronize()


PHASES = ("forward", "backward", "stiefel", "adamw", "head")


class TrainStep:
    """One theta-phase step (+ the per-step eta-phase for a VBLL head), as the library's trainer runs it:
    features -> head loss -> backward -> StiefelOptimizer (U, V) + AdamW (Theta / A, B) -> head refit on
    the detached features (one Adam step, ``HeadCoordinator.refit(..., steps=1)``).

    ``feature_fn(ids, mask)`` defaults to ``polar_vbll.models.last_token_features`` on the adapter's base
    model; pass a compiled one to time ``torch.compile``.
    """

    def __init__(
        self,
        adapter: nn.Module,
        head: nn.Module,
        opt: OptimSpec,
        feature_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from polar_vbll.backbone import last_token_features
        from polar_vbll.config import HeadFitConfig
        from polar_vbll.heads import VBLLHead
        from polar_vbll.training import HeadCoordinator

        self.adapter = adapter
        self.head = head
        self.stiefel, self.adamw = make_optimizers(adapter, opt)
        base = adapter.base_model
        self.feature_fn = feature_fn or (lambda ids, mask: last_token_features(base, ids, mask))
        self.coordinator = HeadCoordinator(head, HeadFitConfig()) if isinstance(head, VBLLHead) else None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.stiefel, self.adamw) if o is not None]

    def __call__(self, b: Batch, phases: dict[str, float] | None = None, sync: Callable[[], None] = no_sync):
        """Run one step. With ``phases``, ``sync()`` and the clocks run between phases and the wall seconds
        (key ``<phase>``) and CPU seconds (``<phase>_cpu``) of each phase are added to it (on CPU ``no_sync``
        costs nothing; on GPU time whole steps without it and use one separate run with it)."""
        marks = [now()] if phases is not None else []

        def mark() -> None:
            if phases is not None:
                sync()
                marks.append(now())

        phi = self.feature_fn(b.ids, b.mask).to(torch.float32)
        loss = self.head.loss(phi, b.labels, b.n_choices)
        for o in self.optimizers():
            o.zero_grad(set_to_none=True)
        mark()
        loss.backward()
        mark()
        if self.stiefel is not None:
            self.stiefel.step()
        mark()
        self.adamw.step()
        mark()
        for p in self.head.parameters():  # the theta-phase never moves the head
            p.grad = None
        if self.coordinator is not None:
            self.coordinator.refit(phi.detach(), b.labels, b.n_choices, steps=1)
        mark()
        if phases is not None:
            for k, (a, z) in zip(PHASES, zip(marks[:-1], marks[1:], strict=True), strict=True):
                phases[k] = phases.get(k, 0.0) + z[0] - a[0]
                phases[k + "_cpu"] = phases.get(k + "_cpu", 0.0) + z[1] - a[1]
        return loss.detach()


# ------------------------------------------------------------------------------------------------ timing
def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


@dataclass
class Timings:
    """Per-call seconds of each function: ``wall`` (perf_counter) and ``cpu`` (process_time)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def get(self, clock: str) -> dict[str, list[float]]:
        return self.cpu if clock == "cpu" else self.wall


def interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int,
    sync: Callable[[], None] = no_sync,
    on_warm: Callable[[], None] | None = None,
) -> Timings:
    """Seconds per call of every function, measured round-robin: each repetition runs every function once
    (the order rotated each time), so slow drifts of a shared machine hit all of them alike and per-round
    ratios stay meaningful. ``warmup`` untimed rounds first, then ``on_warm()`` (e.g. to drop what the
    warmup recorded).

    Both clocks are kept. With one torch thread the CPU time of the process is the work done, nearly
    unaffected by other jobs taking the cores away (wall time is not); on GPU only wall time (with
    ``sync``) means anything."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    if on_warm is not None:
        on_warm()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sync()
            w0, c0 = now()
            fns[n]()
            sync()
            w1, c1 = now()
            wall[n].append(w1 - w0)
            cpu[n].append(c1 - c0)
    return Timings(wall, cpu)


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Stat:
    """Median and spread of a sample."""

    median: float
    q25: float
    q75: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, xs: Sequence[float]) -> Stat:
        return cls(statistics.median(xs), quantile(xs, 0.25), quantile(xs, 0.75), min(xs), max(xs), len(xs))

    def ms(self, digits: int = 1) -> str:
        f = 1e3
        return f"{self.median * f:.{digits}f} ({self.q25 * f:.{digits}f}–{self.q75 * f:.{digits}f})"

    def ratio(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} ({self.q25:.{digits}f}–{self.q75:.{digits}f})"


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> Stat:
    """Median (IQR) of the per-round ratios a_i / b_i (the two measured in the same round)."""
    return Stat.of([x / y for x, y in zip(a, b, strict=True)])


# ------------------------------------------------------------------------------------------------ memory
def read_rss_kb() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, KiB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe_memory(spec: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run ``bench/memprobe.py`` on ``spec`` in a fresh interpreter and return its JSON: RSS after setup,
    peak RSS over the training steps and their difference. glibc's mmap threshold is pinned (128 KiB) in
    the child so that freed tensors go back to the OS and RSS follows live memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "memprobe.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memprobe failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ output
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gib = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import transformers

    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Report:
    """What a benchmark prints and saves: a title, Markdown sections, verdicts and raw data."""

    name: str
    title: str
    command: str = field(default_factory=lambda: "python " + " ".join(sys.argv))
    info: dict[str, Any] = field(default_factory=machine)
    sections: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, text: str) -> None:
        self.sections.append(text)
        print(text + "\n", flush=True)

    def verdict(self, what: str, value: float, target: float, unit: str = "x", le: bool = True) -> bool:
        met = value <= target if le else value >= target
        op = "<=" if le else ">="
        line = f"- **{'MET' if met else 'MISSED'}**: {what}: {value:.3f}{unit} (target {op} {target}{unit})"
        self.verdicts.append(line)
        print(line, flush=True)
        return met

    def markdown(self) -> str:
        i = self.info
        head = [
            f"### {self.title}",
            "",
            f"Command: `{self.command}`  ",
            f"Date: {i['date']}; {i['cpu']} ({i['logical_cpus']} logical CPUs, {i['mem_gib']} GiB), "
            f"Python {i['python']}, torch {i['torch']}, transformers {i['transformers']}, "
            f"peft {i.get('peft', '-')}; torch threads {i['torch_threads']}; load average at start "
            f"{i['loadavg_start']}, at end {i.get('loadavg_end', '-')}"
            + (f"; GPU {i['gpu']}" if "gpu" in i else ""),
            "",
        ]
        body = "\n\n".join(self.sections)
        tail = ["", "Targets:", *self.verdicts] if self.verdicts else []
        return "\n".join(head) + body + "\n" + "\n".join(tail) + "\n"

    def finish(self, out: Path | None) -> None:
        self.info["loadavg_end"] = loadavg()
        text = self.markdown()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{self.name}.md").write_text(text)
            payload = {"name": self.name, "command": self.command, "info": self.info, "data": self.data}
            payload["verdicts"] = self.verdicts
            (out / f"{self.name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
            print(f"wrote {out / (self.name + '.md')} and .json", flush=True)


def _jsonable(o: Any) -> Any:
    if isinstance(o, Stat):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


# ------------------------------------------------------------------------------------------- uncertainty
@dataclass
class UncertaintySuite:
    """Test-time predictors over the same batches. ``single``: one backbone pass per example each;
    ``multi``: MC dropout and the ensemble (plus ``polar_det`` again as their in-group reference)."""

    single: dict[str, Callable[[], torch.Tensor]]
    multi: dict[str, Callable[[], torch.Tensor]]
    n_examples: int
    n_mc: int
    n_members: int


def build_uncertainty_suite(
    shape: Shape,
    batches: Sequence[Batch],
    r: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    n_mc: int = 10,
    n_members: int = 3,
    mc_samples: int = 1000,
) -> UncertaintySuite:
    """Every predictor on its own copy of the same random backbone, each going through the library:

    - ``backbone``: no adapter, deterministic head (the floor);
    - ``lora_det``: peft LoRA (dropout 0.1, off at test time) + deterministic head;
    - ``polar_det``: PoLAR (unmerged) + deterministic head: *the deterministic forward* of the target;
    - ``polar_vbll_mc`` / ``polar_vbll_probit``: the same PoLAR model with a ``VBLLHead``
      (``predict_proba``, MC over ``mc_samples`` logit samples / probit);
    - ``polar_merged_det`` / ``polar_merged_vbll_mc``: PoLAR merged into the weights (serving form);
    - ``mc_dropout_10``: the ``mc_dropout`` predictive (``polar_vbll.predictives``) on the LoRA model,
      ``n_mc`` stochastic passes under a seeded RNG with adapter dropout on, probabilities averaged;
    - ``ensemble_3``: ``n_members`` LoRA adapter states swapped into one model with
      ``load_adapter_state_dict`` (as ``predict_ensemble`` does), one pass each, probabilities averaged.

    Adapter weights are set to small random values (Theta, B) so no path is trivially zero.
    """
    from polar_vbll.adapters import adapter_dropout, seeded_rng, set_adapter_dropout
    from polar_vbll.backbone import last_token_features

    def model_copy() -> nn.Module:
        return build_llama(shape, dtype=dtype, device=device)

    g = torch.Generator().manual_seed(1)

    def randomise(params: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))

    backbone = model_copy()
    lora = attach_adapter(model_copy(), AdapterSpec("lora", r=r, dropout=0.1))
    randomise(lora.theta_parameters())
    set_adapter_dropout(lora, False)
    polar = attach_adapter(model_copy(), AdapterSpec("polar", r=r))
    randomise(polar.theta_parameters())
    merged = attach_adapter(model_copy(), AdapterSpec("polar", r=r))
    merged.load_adapter_state_dict(polar.adapter_state_dict())
    merged.merge()

    det = make_head(backbone, "det")
    vbll_mc = make_head(backbone, "vbll", predictive="mc", mc_samples=mc_samples)
    vbll_probit = make_head(backbone, "vbll", predictive="probit")
    members = [lora.adapter_state_dict()]
    for _ in range(n_members - 1):
        state = {k: v.clone() for k, v in members[0].items()}
        randomise(list(state.values()))
        members.append(state)

    def predict(model: nn.Module, head: nn.Module) -> Callable[[], torch.Tensor]:
        @torch.no_grad()
        def run() -> torch.Tensor:
            out = [
                head.predict_proba(last_token_features(model, b.ids, b.mask).float(), b.n_choices)
                for b in batches
            ]
            return torch.cat(out)

        return run

    run_lora = predict(lora.base_model, det)

    @torch.no_grad()
    def mc_dropout() -> torch.Tensor:
        with seeded_rng(0), adapter_dropout(lora, True):
            total = sum(run_lora().double() for _ in range(n_mc))
        return (total / n_mc).float()

    @torch.no_grad()
    def ensemble() -> torch.Tensor:
        saved = lora.adapter_state_dict()
        probs = []
        try:
            for i, state in enumerate(members):
                lora.load_adapter_state_dict(state, where=f"ensemble member {i}")
                probs.append(run_lora().double())
        finally:
            lora.load_adapter_state_dict(saved, where="the adapter's own state")
        return torch.stack(probs).mean(0).float()

    single = {
        "backbone": predict(backbone, det),
        "lora_det": run_lora,
        "polar_det": predict(polar.base_model, det),
        "polar_vbll_mc": predict(polar.base_model, vbll_mc),
        "polar_vbll_probit": predict(polar.base_model, vbll_probit),
        "polar_merged_det": predict(merged.base_model, det),
        "polar_merged_vbll_mc": predict(merged.base_model, vbll_mc),
    }
    multi = {
        "polar_det": single["polar_det"],
        f"mc_dropout_{n_mc}": mc_dropout,
        f"ensemble_{n_members}": ensemble,
    }
    n = sum(b.ids.shape[0] for b in batches)
    return UncertaintySuite(single, multi, n, n_mc, n_members)
