"""Turning task examples into model inputs and features, on the full path or the cached-prefix path.

``EncodedSplit`` holds one split's token ids, labels and choice counts; ``FeatureSource`` produces
``phi`` for any subset of it, either by running the whole backbone or, on the cheap path, by running only
the adapted top blocks over hidden states that the frozen blocks below produced once.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from polar_vbll.architecture import blocks_of, blocks_path
from polar_vbll.backbone import SplitDecoder, decoder_of, last_token_features
from polar_vbll.errors import ConfigError, UserInputError
from polar_vbll.placement import to_device
from polar_vbll.prefix_cache import (
    DTYPES,
    EntryWriter,
    PrefixCache,
    StoredStates,
    ids_digest,
    prefix_fingerprint,
    prefix_key,
)
from polar_vbll.token_rows import row_lengths
from polar_vbll.tokens import pad_batch, tokenize_prompts


@dataclass
class EncodedSplit:
    """A split ready for the model. ``states`` is filled by :meth:`FeatureSource.prepare` on the cheap path:
    one tensor per example, or, when only a subset was prepared (``prepare(..., indices=...)``: a worker's
    shard), None outside it; ``states_digest`` is then the :meth:`ids_digest` of that subset. Under
    ``train.prefix_cache=stream`` ``states`` reads each example's tensor from the disk cache when indexed
    (:class:`~polar_vbll.prefix_cache.StoredStates`, or :class:`ShardStates` over one)."""

    name: str
    ids: Sequence[Sequence[int]]  # list[list[int]], or a memory-mapped token_rows.TokenRows (a large file)
    labels: torch.Tensor
    n_choices: torch.Tensor
    states: Sequence[torch.Tensor | None] | None = field(default=None, repr=False)
    states_key: str | None = None  # the prefix-cache key the states were computed under (see prefix_cache)
    states_digest: str | None = None  # ids digest of the prepared subset (None: the whole split)
    shortened: dict[str, int] = field(default_factory=dict)  # prompts shortened to fit, per part
    _ids_sha256: str | None = field(default=None, repr=False, compare=False)
    _subset_sha256: dict[tuple[int, ...], str] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def ids_digest(self, indices: Sequence[int] | None = None) -> str:
        """sha256 of the token ids, of the whole split or of the examples ``indices`` in that order
        (computed once each: the ids of a split never change)."""
        if indices is not None:
            subset = tuple(indices)
            if subset not in self._subset_sha256:
                self._subset_sha256[subset] = ids_digest([self.ids[i] for i in subset])
            return self._subset_sha256[subset]
        if self._ids_sha256 is None:
            self._ids_sha256 = ids_digest(self.ids)
        return self._ids_sha256

    def prepared(self) -> int:
        """How many examples hold frozen-prefix states (0 before :meth:`FeatureSource.prepare`)."""
        if self.states is None:
            return 0
        if isinstance(self.states, StoredStates):
            return len(self.states)
        if isinstance(self.states, ShardStates):
            return self.states.prepared
        return sum(s is not None for s in self.states)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the token ids, labels and choice counts: what a prediction on this
        split depends on, so stored predictions are reused only for the same examples."""
        h = hashlib.sha256()
        for seq in self.ids:
            h.update(len(seq).to_bytes(4, "little"))
            h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update(self.n_choices.numpy().tobytes())
        return h.hexdigest()[:16]


class ShardStates(Sequence):
    """The states of a split of ``n`` examples of which only ``order`` (a worker's shard) were prepared:
    ``self[order[k]]`` is ``stored[k]`` (read from disk when indexed), every other example None."""

    def __init__(self, n: int, order: Sequence[int], stored: StoredStates) -> None:
        self.n, self.stored = n, stored
        self.pos = {i: k for k, i in enumerate(order)}

    @property
    def prepared(self) -> int:
        return len(self.pos)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        k = self.pos.get(i % self.n)
        return None if k is None else self.stored[k]


def encode_examples(name: str, examples: Sequence, tokenizer, max_length: int, add_bos: bool) -> EncodedSplit:
    """Tokenize the prompts of ``examples`` (``MCExample``) into an :class:`EncodedSplit`, each fitted to
    ``max_length`` tokens (``polar_vbll.tasks.fit_prompt``: passage, then choices, then question body
    shortened, every label and "Answer:" kept). ``EncodedSplit.shortened`` counts the shortened prompts per
    part; a warning names the examples whose question body had to be shortened."""
    from polar_vbll.tasks import SHORTENABLE, fit_prompt
    from polar_vbll.tasks.file_rows import FileSplit

    if isinstance(examples, FileSplit):
        return _encode_file(name, examples, tokenizer, max_length, add_bos)
    budget = max_length - (1 if add_bos else 0)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fitted = [fit_prompt(ex, count, budget) for ex in examples]
    tokens = tokenize_prompts(tokenizer, [f.text for f in fitted], max_length=max_length, add_bos=add_bos)
    cut_questions = [ex.uid for ex, f in zip(examples, fitted, strict=True) if "question" in f.shortened]
    _warn_cut(name, cut_questions, max_length, stacklevel=3)
    return EncodedSplit(
        name=name,
        ids=tokens.ids,
        labels=torch.tensor([ex.answer for ex in examples], dtype=torch.long),
        n_choices=torch.tensor([len(ex.choices) for ex in examples], dtype=torch.long),
        shortened={part: sum(part in f.shortened for f in fitted) for part in SHORTENABLE},
    )


def _warn_cut(name: str, cut_questions: list[str], max_length: int, stacklevel: int) -> None:
    """The one warning naming the examples whose question body was shortened to fit."""
    if cut_questions:
        more = f" and {len(cut_questions) - 10} more" if len(cut_questions) > 10 else ""
        warnings.warn(
            f"{name}: the question of {len(cut_questions)} prompt(s) was shortened to fit model.max_length="
            f"{max_length} (its start replaced by '...'): {cut_questions[:10]}{more}",
            stacklevel=stacklevel,
        )


def _encode_file(name: str, split, tokenizer, max_length: int, add_bos: bool) -> EncodedSplit:
    """:func:`encode_examples` for the rows of a large file (``tasks.file_rows.FileSplit``): through the
    file's memory-mapped token cache (``polar_vbll.token_file``); the same ids, labels, counts and warning."""
    from polar_vbll.token_file import encode_file_split, open_or_build

    if add_bos and tokenizer.bos_token_id is None:
        raise UserInputError("model.add_bos is true but the tokenizer has no BOS token")
    entry = open_or_build(split.scan, tokenizer, max_length, add_bos)
    if entry is None:  # a tokenizer the cache cannot identify: in memory, from the rows
        return encode_examples(name, list(split), tokenizer, max_length, add_bos)
    enc = encode_file_split(split, entry)
    _warn_cut(name, enc.cut_questions, max_length, stacklevel=4)
    return EncodedSplit(name=name, ids=enc.ids, labels=enc.labels, n_choices=enc.n_choices, shortened=enc.shortened)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def lowest_adapted_block(model: nn.Module) -> int | None:
    """Index of the lowest decoder block that holds a trainable parameter (None: none do)."""
    for i, block in enumerate(blocks_of(model)):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return None


def checked_split(model: nn.Module, split: int, pad_id: int) -> SplitDecoder | None:
    """The cheap path's :class:`SplitDecoder` at ``split``, once it is seen to reproduce the full forward on
    a probe batch (:meth:`SplitDecoder.matches_full_path`); None, with one line saying why, for an
    architecture where it does not (the run then takes the full path: same features, more compute). Not
    checked on ZeRO-3-partitioned weights (a forward outside the engine would not gather them)."""
    split_decoder = SplitDecoder(model, split)
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        return split_decoder
    ok, diff = split_decoder.matches_full_path(pad_id)
    if ok:
        return split_decoder
    name = type(model).__name__
    print(f"note: the cached-prefix path does not reproduce {name}'s full forward (relative difference "
          f"{diff:.2g}); training on the full path (train.cache_frozen_prefix=false)", flush=True)  # fmt: skip
    return None


class FeatureSource:
    """Computes ``phi`` (fp32, ``(B, d)``) for indices of an :class:`EncodedSplit`.

    With ``cache_prefix`` the blocks below the lowest adapted block run once per example (in
    :meth:`prepare`) and their outputs are kept unpadded in memory, in ``store_dtype``; each later call runs
    the adapted top blocks only. The two paths compute the same features (tested; exactly with
    ``store_dtype`` float32, to half-precision rounding of the block inputs otherwise), the cached one at a
    fraction of the cost when few blocks are adapted. With ``disk`` (a
    :class:`~polar_vbll.prefix_cache.PrefixCache`) the states are also read from and written to disk under
    a key of everything they depend on, so another run on the same examples skips the prefix pass.
    ``fingerprint``: the frozen prefix's weight hash when it must be computed before the weights are
    partitioned (ZeRO-3); by default computed on first use. ``stream`` (with ``disk``): the states are
    written to disk as the prefix pass goes and read back per batch, never all held in memory (a large
    training split); without a writable ``disk`` they stay in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        pad_id: int,
        cache_prefix: bool,
        *,
        store_dtype: torch.dtype = torch.float32,
        disk: PrefixCache | None = None,
        fingerprint: str | None = None,
        stream: bool = False,
    ):
        self.model = model
        self.pad_id = pad_id
        self.store_dtype = store_dtype
        self.disk = disk
        self.stream = stream
        self._fingerprint = fingerprint
        self.split: SplitDecoder | None = None
        if cache_prefix:
            lowest = lowest_adapted_block(model)
            if lowest is not None and lowest > 0:
                self.split = checked_split(model, lowest, pad_id)

    @classmethod
    def for_config(cls, model: nn.Module, pad_id: int, train_cfg, *, fingerprint: str | None = None) -> FeatureSource:
        """The source a run's ``train`` settings ask for: the cheap path (``cache_frozen_prefix``) with its
        states kept in ``prefix_cache_dtype`` and, unless ``prefix_cache`` is ``memory``, on disk (only there,
        read per batch, with ``stream``)."""
        disk = PrefixCache() if train_cfg.prefix_cache != "memory" else None
        return cls(model, pad_id, train_cfg.cache_frozen_prefix, store_dtype=DTYPES[train_cfg.prefix_cache_dtype],
                   disk=disk, fingerprint=fingerprint, stream=train_cfg.prefix_cache == "stream")  # fmt: skip

    @property
    def device(self) -> torch.device:
        """Where the backbone lives (inputs and cached states move there per batch)."""
        return next(self.model.parameters()).device

    @property
    def split_block(self) -> int | None:
        return None if self.split is None else self.split.split

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """The frozen prefix's weight hash (:func:`~polar_vbll.prefix_cache.prefix_fingerprint`), computed once
        per model and split while the weights are unchanged (a weight edited in place is hashed again)."""
        if self._fingerprint is not None:
            return self._fingerprint
        assert self.split is not None
        decoder = decoder_of(self.model)
        version = (self.split.split, tuple((p.data_ptr(), p._version) for p in decoder.parameters()))
        memo = getattr(self.model, "_polar_vbll_prefix_fingerprint", None)
        if memo is None or memo[0] != version:
            memo = (version, prefix_fingerprint(decoder, self.split.split, blocks=blocks_path(self.model)))
            object.__setattr__(self.model, "_polar_vbll_prefix_fingerprint", memo)
        return memo[1]

    def key(self, enc: EncodedSplit, indices: Sequence[int] | None = None) -> str:
        """The prefix-cache key of the states of ``enc`` (or of its examples ``indices``, in that order) under
        this model, split block and storage dtype."""
        assert self.split is not None
        digest = enc.ids_digest(indices)
        return prefix_key(self.fingerprint(), self.split.split, self.compute_dtype, self.store_dtype, digest)

    def _current(self, enc: EncodedSplit, key: str) -> bool:
        """Whether ``enc`` holds the states of ``key`` in memory."""
        return enc.states is not None and enc.states_key == key

    def _prepared_key(self, enc: EncodedSplit) -> str:
        """The key the states ``enc`` holds would have under this source (of the subset they cover)."""
        assert self.split is not None
        digest = enc.states_digest or enc.ids_digest()
        return prefix_key(self.fingerprint(), self.split.split, self.compute_dtype, self.store_dtype, digest)

    def on_disk(self, enc: EncodedSplit, indices: Sequence[int] | None = None) -> bool:
        """Whether ``prepare`` (of ``indices``, by default the whole split) would find the states in memory or
        on disk (no prefix pass needed)."""
        if self.split is None:
            return True
        key = self.key(enc, indices)
        return self._current(enc, key) or (self.disk is not None and self.disk.path(key).is_file())

    def prepare(
        self, enc: EncodedSplit, batch_size: int, progress: bool = True, use_disk: bool = True,
        indices: Sequence[int] | None = None, min_batches: int = 0,
    ) -> None:  # fmt: skip
        """Run the frozen prefix over a split once (no-op on the full path or if the states for this key are
        in memory already; read from disk on a key match). ``use_disk=False`` computes even when an entry
        exists (ranks that must run the same collective passes).

        ``indices``: prepare these examples only (a worker's shard); the others' states are None, and
        :meth:`features` refuses them. The disk entry is keyed by those examples' token ids.
        ``min_batches``: run at least this many forward batches, the extra ones over one example (the first
        of ``indices``) with their output dropped (processes whose passes are collectives run as many as the
        one with the most examples)."""
        if self.split is None:
            return
        order = list(range(len(enc))) if indices is None else list(indices)
        key = self.key(enc, indices)
        if self._current(enc, key):
            return
        digest = None if indices is None else enc.ids_digest(indices)
        stream = self.stream and self.disk is not None
        if self.disk is not None and use_disk:
            loaded = self.disk.open(key, len(order)) if stream else self.disk.load(key, len(order))
            if loaded is not None:
                self._keep(enc, order, loaded, key, digest)
                return
        lengths = row_lengths(enc.ids)  # a memory-mapped split's lengths come from its offsets
        kept = self._pass(enc, order, [lengths[i] for i in order], batch_size, key, progress, stream, min_batches)
        self._keep(enc, order, kept, key, digest)

    def _pass(
        self, enc: EncodedSplit, order: list[int], lengths: list[int], batch_size: int, key: str, progress: bool,
        stream: bool, min_batches: int,
    ) -> Sequence[torch.Tensor]:  # fmt: skip
        """The prefix pass over the examples ``order`` (``lengths`` theirs), each batch's states written to the
        disk entry as it comes (with a disk); returns the states in memory, or, with ``stream``, the entry
        read per example (:class:`StoredStates`). When the entry cannot be written (folder not writable,
        disk full) the states stay in memory with one line saying so; with ``stream`` that is a
        ``ConfigError`` instead (the split was meant not to be held in memory)."""
        assert self.split is not None
        computed: list[torch.Tensor | None] = [None] * len(order)
        writer = None  # the entry's EntryWriter once the width is known; False: no entry
        try:
            batches = list(length_sorted_batches(lengths, batch_size))
            desc = f"frozen blocks 0-{self.split.split - 1} on {enc.name}"
            for pos in tqdm(batches, desc=desc, disable=not progress):
                host = self._prefix_states(enc, [order[p] for p in pos])
                if writer is None:
                    writer = self._writer(key, lengths, host.shape[-1], stream)
                for row, p in enumerate(pos):
                    s = host[row, host.shape[1] - lengths[p] :]
                    if writer:
                        writer = self._write(writer, stream, lambda w, p=p, s=s: w.put(p, s))
                    if not stream:
                        computed[p] = s.clone()
            for _ in range(min_batches - len(batches)):  # padding passes: one example, the output dropped
                if len(enc):
                    self._prefix_states(enc, [order[0] if order else 0])
            if writer:
                writer = self._write(writer, stream, EntryWriter.commit)
        except BaseException:
            if writer:
                writer.abort()
            raise
        if stream and order:  # (an empty shard has no entry: nothing to read)
            stored = self.disk.open(key, len(order))  # type: ignore[union-attr]
            if stored is None:
                raise ConfigError(f"the frozen-prefix cache entry {self.disk.path(key)} could not be read back "  # type: ignore[union-attr]
                                  "(replaced or removed during the pass); run again")  # fmt: skip
            return stored
        return computed  # type: ignore[return-value]

    def _writer(self, key: str, lengths: list[int], width: int, stream: bool) -> EntryWriter | bool:
        """The entry's writer, or False (no disk, or a folder not writable: ``ConfigError`` with ``stream``)."""
        if self.disk is None:
            return False
        try:
            return self.disk.writer(key, lengths, width, self.store_dtype)
        except OSError as exc:
            return self._unwritable(exc, stream)

    def _write(self, writer: EntryWriter, stream: bool, action: Callable[[EntryWriter], object]) -> EntryWriter | bool:
        """``action(writer)`` (a ``put`` or the ``commit``); False once a write failed (the entry removed)."""
        try:
            action(writer)
            return writer
        except OSError as exc:
            writer.abort()
            return self._unwritable(exc, stream)

    def _unwritable(self, exc: OSError, stream: bool) -> bool:
        assert self.disk is not None
        if stream:
            raise ConfigError(
                f"train.prefix_cache=stream: the frozen-prefix cache {self.disk.root} cannot be written "
                f"({exc.strerror or exc}); free space or point POLAR_VBLL_PREFIX_CACHE at a writable folder, or "
                "set train.prefix_cache=disk to keep the states in memory"
            ) from exc
        self.disk.unwritable(exc)
        return False

    def _prefix_states(self, enc: EncodedSplit, idx: Sequence[int]) -> torch.Tensor:
        """The frozen prefix's output for the examples ``idx``, left-padded ``(B, T, h)``, on the host in the
        storage dtype (the cache lives in RAM, and on disk: one copy per batch)."""
        assert self.split is not None
        ids, mask = pad_batch([enc.ids[i] for i in idx], self.pad_id, side="left")
        hidden = self.split.prefix_states(to_device(ids, self.device), to_device(mask, self.device))
        self._check_range(hidden)
        return hidden.to("cpu", self.store_dtype)

    @staticmethod
    def _keep(enc: EncodedSplit, order: list[int], states: Sequence, key: str, digest: str | None) -> None:
        """Install the states of the examples ``order`` (in that order) into ``enc``; None elsewhere."""
        if isinstance(states, StoredStates):
            enc.states = states if digest is None else ShardStates(len(enc), order, states)
        elif digest is None:
            enc.states = list(states)
        else:
            full: list[torch.Tensor | None] = [None] * len(enc)
            for i, s in zip(order, states, strict=True):
                full[i] = s
            enc.states = full
        enc.states_key, enc.states_digest = key, digest

    def _check_range(self, hidden: torch.Tensor) -> None:
        """Refuse to store states the storage dtype cannot hold (float16 overflows above 65504 to inf,
        which would reach the head as non-finite features much later)."""
        if self.store_dtype == hidden.dtype:
            return
        top = torch.finfo(self.store_dtype).max
        peak = hidden.detach().abs().max().item()
        if peak > top:
            raise ConfigError(
                f"the frozen blocks' hidden states reach |h| = {peak:.4g}, beyond {self.store_dtype} (max {top:.4g});"
                " set train.prefix_cache_dtype: bfloat16 or float32"
            )

    def features(self, enc: EncodedSplit, idx: Sequence[int]) -> torch.Tensor:
        """``phi`` ``(B, d)`` fp32 on the backbone's device for the examples ``idx`` of ``enc`` (gradients flow
        into adapters when enabled). Token ids, masks and cached states are padded on the host and moved
        once per batch (pinned, asynchronous on CUDA)."""
        seqs = [enc.ids[i] for i in idx]
        ids, mask = pad_batch(seqs, self.pad_id, side="left")
        ids, mask = to_device(ids, self.device), to_device(mask, self.device)
        if self.split is None:
            return last_token_features(self.model, ids, mask).to(torch.float32)
        if enc.states is None or enc.states_key != self._prepared_key(enc):  # normally done up front
            self.prepare(enc, batch_size=32, progress=False)
        rows = [enc.states[i] for i in idx]  # type: ignore[index]
        if any(s is None for s in rows):
            missing = [i for i, s in zip(idx, rows, strict=True) if s is None]
            raise ValueError(
                f"{enc.name}: example(s) {missing[:5]} have no frozen-prefix states in this process: it prepared "
                f"{enc.prepared()} of {len(enc)} examples (its own shard, under data_split=shard)"
            )
        width = ids.shape[1]
        states = torch.zeros((len(idx), width, rows[0].shape[-1]), dtype=self.compute_dtype)  # host, left-padded
        for row, s in enumerate(rows):
            states[row, width - s.shape[0] :] = s
        return self.split.features(to_device(states, self.device), mask).to(torch.float32)

    @torch.no_grad()
    def split_features(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> torch.Tensor:
        """``phi`` ``(N, d)`` float32 on the backbone's device for a whole split in its original order, one
        pass per example (length-sorted batches; adapted blocks only on the cached-prefix path). Adapter
        dropout acts as it is set (off outside training steps; on for the MC-dropout predictive)."""
        self.prepare(enc, batch_size, progress=progress)
        if not len(enc):
            raise ValueError(f"split {enc.name!r} is empty")
        out: torch.Tensor | None = None
        batches = list(length_sorted_batches(row_lengths(enc.ids), batch_size))
        for idx in tqdm(batches, desc=f"features of {enc.name}", disable=not progress):
            phi = self.features(enc, idx)
            if out is None:
                out = torch.empty((len(enc), phi.shape[1]), dtype=torch.float32, device=phi.device)
            out[to_device(torch.tensor(idx), phi.device)] = phi
        assert out is not None
        return out


def prefix_state_bytes(splits) -> int:
    """Bytes of the cached frozen-prefix states held in memory by ``splits`` (each an ``EncodedSplit``; 0 on the
    full path, and for states read from disk per batch, ``train.prefix_cache=stream``)."""
    held = [enc.states for enc in splits if isinstance(enc.states, list)]
    return sum(s.numel() * s.element_size() for states in held for s in states if s is not None)


@torch.no_grad()
def split_features(
    source: FeatureSource, enc: EncodedSplit, batch_size: int, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(phi (N, d), labels, n_choices)`` for a whole split (see :meth:`FeatureSource.split_features`):
    what the eta-phase and the Laplace head fit on. Run it with the adapters in the state you mean."""
    return source.split_features(enc, batch_size, progress), enc.labels.clone(), enc.n_choices.clone()
