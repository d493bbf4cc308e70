"""Issue #20, item 4: the one script that proves polar-vbll on a real GPU, in one `device` call.

Sections, each with its own time budget (a section that would not fit is skipped and says so):

(a) main   the main job's comparison (`compare --config main`: zero-shot, linear probe, PoLAR-MLE (+TS),
           PoLAR-LL-Laplace, PoLAR-VBLL on SST-2) with ``model.device`` set, every block adapted and no
           frozen-prefix cache, through the product's own ``run_compare``; on SmolLM2-135M-Instruct when its
           weights are given (``--model`` folder or ``--gguf`` file), else on a random-weight model of its
           shape (then the table is speed only: the table says which);
(b) step   the product's training step (``Trainer.train_step`` over ``LocalBackend``, as ``polar-vbll train``
           runs it) for PoLAR-VBLL, PoLAR-MLE and the product's LoRA-MLE, against a plain PEFT LoRA step
           written as a PEFT user would (same random-weight Llama of the TinyLlama-1.1B shape in bf16, same
           adapters: r 8 on q, k, v, up, down of every block, same batch of 16 x 256 tokens): median step
           time, the ratio to PEFT, tokens/s, peak GPU memory; timed round-robin in one process;
(c) zero3  a DeepSpeed ZeRO-3 step through ``distributed/backend.py`` (``DeepSpeedBackend``, the sharded
           load of ``distributed/loading.py``) under ``torch.distributed`` with one rank (nccl on CUDA,
           gloo on the CPU), on the same model written once to safetensors; Ray is not needed (its wheel
           does not fit a transfer) and is not used: the Ray Train path is covered on the CPU by the tests;
(d) fits   the full-batch float64 head fits (the VBLL eta-phase's L-BFGS, a last-layer Laplace fit) on the
           CPU, where they run, and on the GPU: the measurement behind that choice.

Writes ``gpu_check.md`` (one Markdown table per section, the machine, the date) and ``gpu_check.json`` to
``--out``. How to run it (docs: README, "GPU check"):

    bash scripts/gpu_prepare.sh               # here, once: data, tokenizer and wheels into .gpu/ (ignored)
    bash scripts/gpu_check.sh                 # there, in one device call with carry [".gpu"]
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gc    # the CPU dry run (CI runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing it (the GPU machine)
    sys.path.insert(0, str(REPO))

#: SmolLM2-135M-Instruct's architecture (its config.json), for the random-weight stand-in of section (a).
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192)  # fmt: skip
#: The TinyLlama-1.1B shape (sections b and c; 1.1 B parameters with a 32k vocabulary).
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=4096)  # fmt: skip
#: The dry run's model (any section).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
#: The main job's split sizes on the dry run (rows per exported split).
TINY_ROWS = {"train": 16, "validation": 12, "test": 12}


# -------------------------------------------------------------------------------------------- export
def export(dest: Path, tiny: bool) -> None:
    """Here, where the bundled packages are installed: the main job's SST-2 splits as JSONL files
    (``dest/sst2/{train,validation,test}.jsonl``, exactly the examples ``compare --config main`` reads) and
    the bundled tokenizer (``dest/tokenizer``). A few MB: they travel with the working tree."""
    from polar_vbll.models import bundled_tokenizer_dir
    from polar_vbll.tasks import load_task

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundled_tokenizer_dir(), dest / "tokenizer", dirs_exist_ok=True)
    (dest / "sst2").mkdir(exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = load_task("sst2", split, seed=0, limit=TINY_ROWS[split] if tiny else None)
        with open(dest / "sst2" / f"{split}.jsonl", "w") as f:
            for ex in rows:
                row = {"id": ex.uid, "question": ex.question, "choices": list(ex.choices), "answer": ex.answer}
                if ex.context:
                    row["context"] = ex.context
                f.write(json.dumps(row) + "\n")
    print(f"exported the main job's SST-2 splits and the tokenizer to {dest}")


# ------------------------------------------------------------------------------------------- budget
@dataclass
class Section:
    """One section's outcome: its table (Markdown), status and facts for the JSON."""

    name: str
    title: str
    status: str = "not run"
    seconds: float = 0.0
    table: str = ""
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Budget:
    """The script's wall-clock budget; each section gets a share and is skipped when too little is left."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.total = time.perf_counter(), seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)


def run_section(section: Section, fn: Callable[[Section], None], budget: Budget, need_s: float) -> Section:
    """``fn(section)`` when at least ``need_s`` seconds are left; a failure is recorded, not raised, so the
    other sections still run and the report is still written."""
    if budget.left() < need_s:
        section.status = f"skipped: {budget.left():.0f} s left of the budget, the section needs about {need_s:.0f} s"
        return section
    t = time.perf_counter()
    try:
        fn(section)
        section.status = "ok"
    except Exception as exc:  # noqa: BLE001 (one line in the report, the traceback on stderr)
        traceback.print_exc()
        section.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        section.seconds = time.perf_counter() - t
    return section


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> int:
    """Reset the peak counter; returns the bytes allocated now (0 on the CPU: no allocator statistics)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n else "-"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- models
def random_llama(shape: dict[str, Any], vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A frozen random-weight ``LlamaForCausalLM`` built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


def write_model(model, tokenizer_dir: Path | None, dest: Path) -> Path:
    """``model`` (and the tokenizer) as a safetensors folder that ``model.source: path`` loads."""
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, dest / f.name)
    return dest


def smollm2_dir(args, work: Path, device: torch.device) -> tuple[Path, str]:
    """The folder section (a) trains: ``--model``, or ``--gguf`` converted once, or a random-weight model
    of SmolLM2's shape with the exported tokenizer. Returns ``(folder, what it is)``."""
    if args.model:
        return Path(args.model), f"SmolLM2 weights from {args.model}"
    tok_dir = Path(args.data) / "tokenizer"
    if args.gguf:
        from transformers import AutoModelForCausalLM

        gguf = Path(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        from transformers import AutoConfig

        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        return write_model(plain, tok_dir, work / "smollm2"), f"SmolLM2-135M-Instruct ({gguf.name}, dequantised)"
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    shape = TINY if args.tiny else SMOLLM2
    model = random_llama(shape, vocab, torch.float32, torch.device("cpu"))
    what = "a tiny random Llama (dry run)" if args.tiny else "random weights of SmolLM2-135M's shape (speed only)"
    return write_model(model, tok_dir, work / "smollm2-random"), what


# ----------------------------------------------------------------------------------------- (a) main
def section_main(args, work: Path, device: torch.device) -> Callable[[Section], None]:
    def run(s: Section) -> None:
        from polar_vbll.compare.config import load_compare_config
        from polar_vbll.compare.runner import run_compare
        from polar_vbll.config import resolve_config

        folder, what = smollm2_dir(args, work, device)
        data = Path(args.data).resolve() / "sst2"
        overrides = [
            f"tasks=[jsonl:{data}]", f"output_dir={work}", "name=gpu-main",
            "base.model.source=path", f"base.model.path={folder}", f"base.model.device={args.device}",
            "base.model.dtype=auto", "base.polar.layers=null", "base.lora.layers=null",
            "base.train.cache_frozen_prefix=false",
        ]  # fmt: skip
        if args.tiny:
            overrides += ["base.train.steps=2", "base.train.round_steps=1", "base.head.fit.max_iter=20",
                          "base.head.vbll.mc_samples=50", "base.model.max_length=64"]  # fmt: skip
        ccfg = load_compare_config(resolve_config("main", "compare"), overrides)
        base = peak_reset(device)
        t = time.perf_counter()
        run_compare(ccfg, progress=False, track=False)
        wall = time.perf_counter() - t
        table = (work / "gpu-main" / "results.md").read_text()
        s.table = table.strip()
        s.notes.append(f"model: {what}; device {args.device}, dtype auto (bfloat16 on a GPU that has it); every one "
                       f"of the model's blocks adapted, no frozen-prefix cache; wall time {wall:.1f} s for the whole "
                       f"comparison; peak GPU memory {gib(peak(device) - base)} GiB")  # fmt: skip
        s.data.update({"wall_s": wall, "model": what, "peak_bytes": peak(device) - base})

    return run


# ----------------------------------------------------------------------------------------- (b) step
class _Tok:
    pad_token_id = 0


def synthetic_split(n: int, seq: int, vocab: int, k: int = 4, seed: int = 0):
    """``n`` random prompts of ``seq`` tokens (no padding), labels among ``k`` choices."""
    from polar_vbll.features import EncodedSplit

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return EncodedSplit("train", ids.tolist(), torch.randint(0, k, (n,), generator=g), torch.full((n,), k))


def product_config(method: str, args, batch: int, dtype: str, compiled: bool = False):
    from polar_vbll.config import parse_config

    adapter = {"r": 8, "alpha": 32, "target_modules": TARGETS, "layers": None}
    return parse_config({
        "method": method, "name": f"step-{method}", "output_dir": tempfile.mkdtemp(prefix="gpu-check-"),
        "model": {"source": "tiny", "device": args.device, "dtype": dtype},
        "polar": adapter, "lora": adapter,
        "train": {"steps": 100000, "batch_size": batch, "eval_batch_size": batch, "cache_frozen_prefix": False,
                  "round_steps": 100000, "checkpoint_every": 0, "compile": compiled},
        "head": {"fit": {"max_iter": 50}},
    }, "gpu_check")  # fmt: skip


def product_step(method: str, args, model, split, batch: int, dtype: str, compiled: bool = False):
    """The product's objects as every entry point builds them (``build_session`` over a given backbone and
    split), the ``LocalBackend`` and the ``Trainer``; returns ``step()`` (one unsynced optimizer step, as
    ``fit`` takes between logging steps) and the trainer. ``compiled``: ``train.compile``."""
    from polar_vbll.placement import placement_for
    from polar_vbll.runner import local_backend
    from polar_vbll.session import build_session
    from polar_vbll.training import LocalCheckpoints, LocalCoordinator, Trainer

    cfg = product_config(method, args, batch, dtype, compiled)
    splits = {"train": split, "validation": split, "eval": split}
    session = build_session(cfg, splits=splits, answer_ids=[10, 11, 12, 13], load=lambda m, p: (model, _Tok()),
                            placement=placement_for(cfg.model), memory_check=False)  # fmt: skip
    backend = local_backend(session)
    trainer = Trainer(cfg, session.adapter, session.head, session.splits, backend,
                      LocalCoordinator(session.head, cfg.head.fit), LocalCheckpoints(cfg.run_dir(), 1),
                      progress=False)  # fmt: skip
    trainer.init_joint_head()
    trainer.train_step(sync=True)  # step 0: the first head refit (VBLL), off the timed steps
    return (lambda: trainer.train_step(sync=False)), trainer


def peft_step(model, split, batch: int, device: torch.device):
    """A PEFT LoRA training step as a PEFT user writes it: ``get_peft_model``, a linear head on the last
    token's final hidden state, cross-entropy, fused AdamW; the batch moved from pinned host memory."""
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    head = torch.nn.Linear(model.config.hidden_size, 4, device=device)
    params = [p for p in lora.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=4e-3, **({"fused": True} if device.type == "cuda" else {}))
    from polar_vbll.backbone import decoder_of

    decoder = decoder_of(model)  # peft injected its layers into ``model`` in place
    ids = torch.tensor(split.ids[:batch])
    labels = split.labels[:batch]
    if device.type == "cuda":
        ids, labels = ids.pin_memory(), labels.pin_memory()

    def step():
        x, y = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        hidden = decoder(input_ids=x, use_cache=False).last_hidden_state[:, -1].float()
        loss = torch.nn.functional.cross_entropy(head(hidden), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_round_robin(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device,
                     deadline: float) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each function, round-robin (the order rotated each round), synced around each
    call; stops early at ``deadline`` (perf_counter) after at least 3 rounds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sync(device)
            t = time.perf_counter()
            fns[n]()
            sync(device)
            out[n].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return out


def section_step(args, device: torch.device, budget: Budget, share_s: float) -> Callable[[Section], None]:
    def run(s: Section) -> None:
        deadline = time.perf_counter() + share_s
        shape = TINY if args.tiny else TINYLLAMA
        batch, seq = (4, 32) if args.tiny else (16, 256)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        dname = "float32" if dtype == torch.float32 else "bfloat16"
        vocab = 1024 if args.tiny else 32000
        split = synthetic_split(batch * 4, seq, vocab)
        fns: dict[str, Callable[[], Any]] = {}
        mem: dict[str, int] = {}
        models = {}
        # train.compile (off by default until measured): with --compile, a fifth row (its compilation is paid
        # in the warm-up rounds, so give the section room: e.g. --sections step --compile)
        variants = ["peft_lora", "lora_mle", "polar_mle", "polar_vbll"]
        variants += ["polar_vbll_compiled"] if args.compile else []
        for name in variants:
            before = peak_reset(device)
            models[name] = random_llama(shape, vocab, dtype, device)
            if name == "peft_lora":
                fns[name] = peft_step(models[name], split, batch, device)
            else:
                method = name.removesuffix("_compiled")
                fns[name], _ = product_step(method, args, models[name], split, batch, dname, name != method)
            mem[name + "_resident"] = (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - before
        times = time_round_robin(fns, reps=3 if args.tiny else 20, warmup=1 if args.tiny else 3, device=device,
                                 deadline=deadline)  # fmt: skip
        for name, fn in fns.items():  # each step's own working memory, one at a time
            base = peak_reset(device)
            fn()
            mem[name + "_step"] = peak(device) - base
        med = {n: statistics.median(t) for n, t in times.items()}
        tokens = batch * seq
        labels = {"peft_lora": "PEFT LoRA (reference, plain loop)", "lora_mle": "polar-vbll LoRA-MLE (Trainer)",
                  "polar_mle": "polar-vbll PoLAR-MLE (Trainer)", "polar_vbll": "polar-vbll PoLAR-VBLL (Trainer)",
                  "polar_vbll_compiled": "polar-vbll PoLAR-VBLL (Trainer, train.compile)"}
        rows = []
        for n in fns:
            ratios = [a / b for a, b in zip(times[n], times["peft_lora"], strict=True)]
            rows.append([labels[n], f"{1e3 * med[n]:.1f}", f"{statistics.median(ratios):.2f}",
                         f"{tokens / med[n]:,.0f}", gib(mem[n + "_resident"]), gib(mem[n + "_step"]), len(times[n])])
        n_params = sum(p.numel() for p in models["lora_mle"].parameters() if not p.requires_grad)
        s.table = md_table(["step", "median ms", "x PEFT (paired)", "tokens/s", "model + state GiB",
                            "step peak GiB", "rounds"], rows)  # fmt: skip
        shape_name = "tiny" if args.tiny else "TinyLlama-1.1B"
        s.notes.append(
            f"random-weight Llama, {n_params / 1e9:.2f} B parameters ({shape_name} shape), {dname}; batch {batch} x "
            f"{seq} tokens; r 8, alpha 32 on {', '.join(TARGETS)} of every block; the product's steps unsynced (as "
            "`fit` runs them between logging steps), timed with a device sync around each call, round-robin"
        )
        s.data.update({"median_s": med, "memory_bytes": mem, "tokens_per_step": tokens, "parameters": n_params})
        del models, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return run


# ---------------------------------------------------------------------------------------- (c) ZeRO-3
def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def section_zero3(args, work: Path, device: torch.device, share_s: float) -> Callable[[Section], None]:
    def run(s: Section) -> None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError("deepspeed is not installed (scripts/gpu_check.sh installs the carried sdist)")
        import torch.distributed as dist

        from distributed.backend import DeepSpeedBackend
        from distributed.config import DistConfig
        from distributed.worker import BackboneLoad
        from polar_vbll.config import parse_config
        from polar_vbll.placement import placement_for, resolved
        from polar_vbll.session import build_session
        from polar_vbll.training import LocalCheckpoints, LocalCoordinator, Trainer

        deadline = time.perf_counter() + share_s
        shape = TINY if args.tiny else TINYLLAMA
        batch, seq = (4, 32) if args.tiny else (16, 256)
        dname = "float32" if device.type == "cpu" else "bfloat16"
        tok_dir = Path(args.data) / "tokenizer"
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
        t = time.perf_counter()
        folder = write_model(random_llama(shape, vocab, getattr(torch, dname), torch.device("cpu")), tok_dir,
                             work / "zero3-model")  # fmt: skip
        s.notes.append(f"wrote the random model to safetensors in {time.perf_counter() - t:.1f} s")
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})  # fmt: skip
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        try:
            adapter = {"r": 8, "alpha": 32, "target_modules": TARGETS, "layers": None}
            cfg = resolved(parse_config({
                "method": "polar_vbll", "name": "zero3", "output_dir": str(work),
                "model": {"source": "path", "path": str(folder), "device": args.device, "dtype": dname},
                "polar": adapter,
                "train": {"steps": 100000, "batch_size": batch, "eval_batch_size": batch,
                          "cache_frozen_prefix": False, "round_steps": 100000},
                "head": {"fit": {"max_iter": 50}},
            }, "gpu_check zero3"))  # fmt: skip
            dist_cfg = DistConfig(workers=1, zero_stage=3, use_gpu=device.type == "cuda")
            split = synthetic_split(batch * 4, seq, vocab)
            splits = {"train": split, "validation": split, "eval": split}
            loader = BackboneLoad(cfg, dist_cfg, batch)
            base = peak_reset(device)
            t = time.perf_counter()
            session = build_session(cfg, splits=splits, answer_ids=[10, 11, 12, 13], load=loader,
                                    head_rows=loader.head_rows, placement=placement_for(cfg.model),
                                    memory_check=False)  # fmt: skip
            backend = DeepSpeedBackend(cfg, dist_cfg, session.adapter.base_model, session.adapter.theta_parameters(),
                                       session.tokenizer.pad_token_id, batch, loader.fingerprint_chunks)  # fmt: skip
            load_s = time.perf_counter() - t
            resident = (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - base
            trainer = Trainer(cfg, session.adapter, session.head, session.splits, backend,
                              LocalCoordinator(session.head, cfg.head.fit), LocalCheckpoints(cfg.run_dir(), 1),
                              progress=False)  # fmt: skip
            trainer.train_step(sync=True)  # the first head refit, off the timed steps
            step = {"zero3": lambda: trainer.train_step(sync=False)}
            times = time_round_robin(step, reps=3 if args.tiny else 15, warmup=1 if args.tiny else 2, device=device,
                                     deadline=deadline)["zero3"]  # fmt: skip
            stepbase = peak_reset(device)
            logs = trainer.train_step(sync=True)
            step_peak = peak(device) - stepbase
            med = statistics.median(times)
            s.table = md_table(
                ["step", "median ms", "tokens/s", "load + init s", "model + state GiB", "step peak GiB", "loss",
                 "rounds"],
                [["PoLAR-VBLL, DeepSpeed ZeRO-3, 1 rank (DeepSpeedBackend + Trainer)", f"{1e3 * med:.1f}",
                  f"{batch * seq / med:,.0f}", f"{load_s:.1f}", gib(resident), gib(step_peak), f"{logs['loss']:.4f}",
                  len(times)]],
            )  # fmt: skip
            s.notes.append(f"{'nccl' if device.type == 'cuda' else 'gloo'}, world size 1, sharded load from "
                           f"safetensors, {dname} backbone; same model shape and batch as section (b)")  # fmt: skip
            s.data.update({"median_s": med, "load_s": load_s, "resident_bytes": resident, "step_peak_bytes": step_peak})
        finally:
            dist.destroy_process_group()

    return run


# ------------------------------------------------------------------------------------------ (d) fits
def section_fits(args, device: torch.device) -> Callable[[Section], None]:
    """Where the full-batch float64 head fits should run (docs/method-choices.md, "Where the head fits run"):
    the eta-phase's L-BFGS of a VBLL head and a last-layer Laplace fit on N x D random features, on the CPU
    (where they run) and, on a GPU machine, on the GPU in float64, each timed once after a warm-up."""

    def run(s: Section) -> None:
        from polar_vbll.heads import VBLLHead
        from polar_vbll.heads.fit import fit_to_convergence
        from polar_vbll.heads.laplace import LastLayerLaplace

        sizes = [(64, 16, 2)] if args.tiny else [(523, 576, 2), (5000, 2048, 4)]
        where = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
        rows = []
        for n, d, k in sizes:
            g = torch.Generator().manual_seed(0)
            phi, w = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g) * 0.05
            labels, counts = torch.randint(0, k, (n,), generator=g), torch.full((n,), k)
            for dev in where:
                head = VBLLHead.from_weight(w, dataset_size=n).to(dev)
                x, y, c = phi.to(dev), labels.to(dev), counts.to(dev)
                head.fit_features(x)
                fit_to_convergence(head, x[:32], y[:32], c[:32], max_iter=5)  # warm-up (kernels, allocator)
                sync(dev)
                t = time.perf_counter()
                report = fit_to_convergence(head, x, y, c, max_iter=200)
                sync(dev)
                lbfgs = time.perf_counter() - t
                t = time.perf_counter()
                LastLayerLaplace(w.to(dev), structure="kron").fit(x, y, c)
                sync(dev)
                lap = time.perf_counter() - t
                rows.append([f"{n} x {d}, K={k}", dev.type, f"{lbfgs:.2f} ({report.iterations} it)", f"{lap:.2f}"])
        s.table = md_table(["features N x D", "device", "VBLL eta-phase L-BFGS s (float64)",
                            "Laplace kron fit s (float64)"], rows)  # fmt: skip
        s.notes.append(f"CPU threads {torch.get_num_threads()}; random features; one timed fit each after a warm-up")
        s.data["rows"] = rows

    return run


# ------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU dry run)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("-",)
    return (f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}; {os.cpu_count()} CPUs, load average {load[0]:.2f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip


def report(sections: list[Section], out: Path, device: torch.device, total_s: float) -> str:
    lines = ["# polar-vbll GPU check (bench/gpu_check.py)", "", f"Machine: {machine(device)}.",
             f"Total wall time {total_s:.0f} s.", ""]  # fmt: skip
    for s in sections:
        lines += [f"## ({s.name}) {s.title}", "", f"Status: {s.status} ({s.seconds:.0f} s).", ""]
        if s.table:
            lines += [s.table, ""]
        lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    blob = {s.name: {"status": s.status, "seconds": s.seconds, "notes": s.notes, **s.data} for s in sections}
    (out / "gpu_check.json").write_text(json.dumps(blob, indent=2, default=str))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny models and data: the CPU dry run")
    p.add_argument("--data", default=".gpu", help="the folder --export wrote (data and tokenizer)")
    p.add_argument("--export", action="store_true", help="write --data here (needs the bundled packages) and exit")
    p.add_argument("--model", help="section (a): a SmolLM2 safetensors folder")
    p.add_argument("--gguf", help="section (a): SmolLM2's GGUF file (needs the gguf package)")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole script")
    p.add_argument("--sections", default="main,step,zero3,fits", help="which sections, comma-separated")
    p.add_argument("--compile", action="store_true", help="section (b) also times PoLAR-VBLL with train.compile")
    args = p.parse_args(argv)
    if args.export:
        export(Path(args.data), args.tiny)
        return 0
    from polar_vbll.placement import resolve_device

    device = resolve_device(args.device)
    budget = Budget(args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="polar-vbll-gpu-check-"))
    os.environ.setdefault("POLAR_VBLL_PREFIX_CACHE", str(work / "prefix"))
    wanted = set(args.sections.split(","))
    # shares of the budget: (a) about half, (b) a third, (c) the rest; each skipped when its minimum is not left
    shares = {"main": 0.4, "step": 0.3, "zero3": 0.2, "fits": 0.1}
    minimum = {"main": 20.0 if args.tiny else 90.0, "step": 10.0 if args.tiny else 45.0,
               "zero3": 10.0 if args.tiny else 40.0, "fits": 2.0 if args.tiny else 15.0}  # fmt: skip
    total = args.budget_s
    sections = []
    plan = [
        ("main", "the main job's comparison on the device", lambda: section_main(args, work, device)),
        ("step", "the product's training step against PEFT LoRA",
         lambda: section_step(args, device, budget, shares["step"] * total)),
        ("zero3", "a DeepSpeed ZeRO-3 step through distributed/backend.py",
         lambda: section_zero3(args, work, device, shares["zero3"] * total)),
        ("fits", "the float64 head fits on the CPU and on the device", lambda: section_fits(args, device)),
    ]  # fmt: skip
    t0 = time.perf_counter()
    for name, title, make in plan:
        s = Section(name, title)
        if name not in wanted:
            s.status = "not asked for (--sections)"
        else:
            run_section(s, make(), budget, minimum[name])
        print(f"({name}) {s.status} in {s.seconds:.0f} s", flush=True)
        sections.append(s)
    text = report(sections, Path(args.out), device, time.perf_counter() - t0)
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s.status.startswith(("ok", "not asked")) for s in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
