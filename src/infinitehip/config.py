"""HiPConfig: every knob of InfiniteHiP attention in one frozen, validated dataclass."""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence

_ROPE_PRUNE_MODES = ("auto", "exact", "relative")
_ROPE_ATTEND_MODES = ("auto", "exact", "streaming")
_HEAD_SHARING = ("kv", "all")


def is_int(x) -> bool:
    """An int that is not a bool (True passes isinstance(x, int)): every config's integer check."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """An int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class HiPConfig:
    """Configuration of hierarchical pruning + block-sparse attention.

    Every query row attends to three disjoint key sets: the first ``sink`` keys, the keys
    selected by pruning (``budget`` tokens, in chunks of ``chunk_sizes[-1]``), and a sliding
    window of the latest ``window`` keys (anchored at the start of the row's query block).

    Pruning runs ``len(chunk_sizes)`` stages. Stage ``s`` scores chunks of ``chunk_sizes[s]``
    tokens by their representative token (hierarchical top-1) against the block's queries,
    pooled in groups of ``stage_strides[s]``; it keeps as many chunks as ``stage_budgets[s+1]``
    tokens (``budget`` after the last stage). ``stage_budgets[0]`` is ``None``: stage 0 sees
    the whole context.
    """

    sink: int = 256
    window: int = 1024
    block_size_q: int = 64
    chunk_sizes: tuple[int, ...] = (256, 32, 8)
    stage_budgets: tuple[int | None, ...] = (None, 32768, 8192)
    stage_strides: tuple[int, ...] = (4, 4, 1)
    budget: int = 2048
    # The first layers attend broadly: they get a larger budget (negative indices count from the end).
    dense_layers: tuple[int, ...] = (0, 1, 2, 3, -1)
    dense_layer_budget: int = 4096
    # Stage 0's hierarchical top-1 stops after this many levels (None: down to one token). Then
    # every probe of stage 0 is at a fixed position, which an offloaded cache can keep on the GPU.
    stage0_levels: int | None = None
    # Decode: stage s is rerun every refresh_intervals[s] steps, and with every earlier stage's rerun
    # (so entries do not grow); in between the mask is reused.
    refresh_intervals: tuple[int, ...] = (32, 16, 8)
    # Decode: a refreshed mask takes effect this many steps after the step whose query pruned it
    # (0: at once, the paper's). With a lag the pruning runs beside decode (a side CUDA stream)
    # instead of in the step: what an offloaded cache's probes over PCIe cost stops adding to it.
    refresh_lag: int = 0
    # "kv": one mask per KV head (its query heads share it); "all": one mask for every head.
    head_sharing: str = "kv"
    # "auto" = exact positions while the context fits model_context_length, adaptive beyond it
    # (None: no trained length known, adaptive throughout).
    rope_prune: str = "auto"
    rope_attend: str = "auto"
    model_context_length: int | None = None
    # Contexts up to this many keys (capped at model_context_length) use dense attention: on an
    # H100 sparse decode beat cuDNN from 16K keys, prefill only from 128K (benchmarks/results/
    # attention_h100.json); 64K sits between the two. 0 disables.
    dense_threshold: int = 65536

    def __post_init__(self):
        for name in ("chunk_sizes", "stage_budgets", "stage_strides", "refresh_intervals", "dense_layers"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"HiPConfig.{name}={value!r} is invalid: must be a tuple "
                                 f"(the paper's: {self.__dataclass_fields__[name].default})")
            # {8, 4, 2} iterated as (8, 2, 4): stages silently swapped; {0: 1} as its keys, (0,)
            if isinstance(value, (AbstractSet, Mapping)):
                why = ("gives only its keys" if isinstance(value, Mapping) else
                       "has no order" + (", and entries go by stage" if name != "dense_layers" else ""))
                raise ValueError(f"HiPConfig.{name}={value!r} is invalid: must be a tuple or list "
                                 f"(a {type(value).__name__} {why}; the paper's: "
                                 f"{self.__dataclass_fields__[name].default})")
            object.__setattr__(self, name, tuple(value))
        self._validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "HiPConfig":
        """A named preset (see ``PRESETS``), with fields overridden by keyword."""
        if not isinstance(name, str) or name not in PRESETS:   # a list: "unhashable type: 'list'"
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> "HiPConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def n_stages(self) -> int:
        return len(self.chunk_sizes)

    @property
    def chunk_size(self) -> int:
        """Granularity of the final mask (the last stage's chunk size)."""
        return self.chunk_sizes[-1]

    @property
    def n_selected(self) -> int:
        """Entries of the final mask: selected chunks per query block and head group."""
        return self.budget // self.chunk_size

    def n_kept(self, stage: int) -> int:
        """How many chunks stage ``stage`` keeps (its output, in chunks of its own size)."""
        tokens = self.budget if stage == self.n_stages - 1 else self.stage_budgets[stage + 1]
        return tokens // self.chunk_sizes[stage]

    def probe_levels(self, stage: int) -> int:
        """Levels of stage ``stage``'s hierarchical top-1: log2 of its chunk (down to one token),
        for stage 0 at most ``stage0_levels``."""
        return descent_levels(self.chunk_sizes[stage], None if stage else self.stage0_levels)

    def for_layer(self, layer: int, num_layers: int) -> "HiPConfig":
        """The config of one layer: dense layers get ``dense_layer_budget``."""
        if not 0 <= layer < num_layers:   # num_layers 0 was a ZeroDivisionError below
            raise ValueError(f"layer {layer} of a {num_layers}-layer model: give 0 <= layer < num_layers")
        # Indices past the model name no layer (the paper's first four + last, on a 2-layer model: both).
        dense = {i % num_layers for i in self.dense_layers if -num_layers <= i < num_layers}
        if layer % num_layers in dense and self.dense_layer_budget != self.budget:
            return dataclasses.replace(self, budget=self.dense_layer_budget)
        return self

    @property
    def dense_cutoff(self) -> int:
        """Calls with at most this many keys attend densely: sparse attention would attend every
        key anyway, or is slower there (``dense_threshold``, capped at the trained context:
        beyond it only sparse attention with adaptive RoPE works)."""
        crossover = self.dense_threshold
        if self.model_context_length is not None:
            crossover = min(crossover, self.model_context_length)
        return max(self.sink + self.window, crossover)

    def refresh_stage(self, step: int) -> int:
        """First pruning stage to rerun at decode step ``step`` (``n_stages`` = reuse the mask).

        Step 0 runs every stage; afterwards the first stage whose interval divides the step is
        rerun from its saved input, together with the stages after it.
        """
        if step == 0:
            return 0
        for stage, interval in enumerate(self.refresh_intervals):
            if step % interval == 0:
                return stage
        return self.n_stages

    def refreshes_upto(self, step: int) -> int:
        """Decode steps in [1, step] that rerun pruning (step 0, which prunes from scratch, not
        counted): with ``refresh_lag`` the index of the mask a step prunes for later."""
        return _refreshes_upto(self.refresh_intervals, step)

    @property
    def pending_slots(self) -> int:
        """With ``refresh_lag``: masks a decode row keeps at once -- those pruned and not yet in
        use, and the newest one in use (the next refresh prunes from it)."""
        return _pending_slots(self.refresh_intervals, self.refresh_lag)

    # ------------------------------------------------------------------ validation
    def _validate(self):
        def fail(field, got, allowed):
            raise ValueError(f"HiPConfig.{field}={got!r} is invalid: {allowed}")

        for field in ("sink", "dense_threshold"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 0:
                fail(field, getattr(self, field), "must be an integer >= 0")
        for field in ("window", "budget", "dense_layer_budget"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 1:
                fail(field, getattr(self, field), "must be an integer >= 1")
        if not is_int(self.block_size_q) or self.block_size_q not in (16, 32, 64, 128):
            fail("block_size_q", self.block_size_q, "must be one of 16, 32, 64, 128")
        n = len(self.chunk_sizes)
        if n == 0:
            fail("chunk_sizes", self.chunk_sizes, "needs at least one pruning stage")
        for field in ("stage_budgets", "stage_strides", "refresh_intervals"):
            if len(getattr(self, field)) != n:
                fail(field, getattr(self, field), f"needs one entry per stage ({n}, like chunk_sizes)")
        for s, c in enumerate(self.chunk_sizes):
            if not is_int(c) or not _is_pow2(c) or c < 2:
                fail("chunk_sizes", self.chunk_sizes, "each must be a power of two >= 2")
            if s and self.chunk_sizes[s - 1] % c:
                fail("chunk_sizes", self.chunk_sizes, "each must divide the previous one")
        if self.stage_budgets[0] is not None:
            fail("stage_budgets", self.stage_budgets, "the first entry must be None (stage 0 sees everything)")
        for s in range(1, n):
            b = self.stage_budgets[s]
            if not is_int(b) or b < self.chunk_sizes[s - 1] or b % self.chunk_sizes[s - 1]:
                fail("stage_budgets", self.stage_budgets,
                     f"entry {s} must be a positive multiple of chunk_sizes[{s - 1}]={self.chunk_sizes[s - 1]}")
            if s > 1 and b > self.stage_budgets[s - 1]:
                fail("stage_budgets", self.stage_budgets, "budgets must not grow from stage to stage")
        last_in = self.stage_budgets[-1]
        for field in ("budget", "dense_layer_budget"):
            b = getattr(self, field)
            if b % self.chunk_size:
                fail(field, b, f"must be a multiple of the last chunk size {self.chunk_size}")
            if last_in is not None and b > last_in:
                fail(field, b, f"must be <= the last stage's budget {last_in}")
        for field, entry, tokens, chunk in _mask_rows(self):
            if tokens // chunk > MAX_MASK_ROW:   # 2**30 allocated gigabytes of masks on any context
                fail(field, getattr(self, field), f"{entry}{tokens:,} tokens are {tokens // chunk:,} chunks of {chunk} "
                     f"in every mask row, more than {MAX_MASK_ROW:,}: give at most {MAX_MASK_ROW * chunk:,} (a "
                     "budget as long as the context keeps every key already)")
        lv, depth = self.stage0_levels, self.chunk_sizes[0].bit_length() - 1
        if lv is not None and (not is_int(lv) or not 1 <= lv <= depth):
            fail("stage0_levels", lv, f"must be None or an integer in [1, {depth}] (log2 of chunk_sizes[0])")
        for st in self.stage_strides:
            if not is_int(st) or st < 1 or self.block_size_q % st:
                fail("stage_strides", self.stage_strides, f"each must divide block_size_q={self.block_size_q}")
        for s, r in enumerate(self.refresh_intervals):
            if not is_int(r) or r < 1:
                fail("refresh_intervals", self.refresh_intervals, "each must be an integer >= 1")
            if s and r > self.refresh_intervals[s - 1]:   # (8, 16, 32): every stage every 8 steps, silently
                fail("refresh_intervals", self.refresh_intervals,
                     f"must not grow from stage to stage: a stage also reruns whenever an earlier one does, so stage "
                     f"{s} would rerun at least every {self.refresh_intervals[s - 1]} steps, not every {r}; give "
                     f"e.g. {tuple(sorted(self.refresh_intervals, reverse=True))}")
        lag = self.refresh_lag
        if not is_int(lag) or lag < 0:
            fail("refresh_lag", lag, "must be an integer >= 0 (decode steps between pruning a mask and using it)")
        if self.window < max(self.refresh_intervals) + lag:
            fail("window", self.window,
                 f"must be >= the longest refresh interval plus refresh_lag, {max(self.refresh_intervals)} + {lag}: "
                 "tokens decoded between mask refreshes are only seen through the window (raise window or "
                 "lower refresh_lag / refresh_intervals)")
        if lag and math.lcm(*self.refresh_intervals) > _MAX_LAG_PERIOD:
            fail("refresh_intervals", self.refresh_intervals,
                 f"repeat only every {math.lcm(*self.refresh_intervals):,} steps (their lcm), more than "
                 f"{_MAX_LAG_PERIOD:,} that refresh_lag's bookkeeping works out: use intervals that divide "
                 "each other, like the presets'")
        if not all(is_int(i) for i in self.dense_layers):
            fail("dense_layers", self.dense_layers, "each must be a layer index (an integer; -1 is the last layer)")
        if self.head_sharing not in _HEAD_SHARING:
            fail("head_sharing", self.head_sharing, f"must be one of {_HEAD_SHARING}")
        if self.rope_prune not in _ROPE_PRUNE_MODES:
            fail("rope_prune", self.rope_prune, f"must be one of {_ROPE_PRUNE_MODES}")
        if self.rope_attend not in _ROPE_ATTEND_MODES:
            fail("rope_attend", self.rope_attend, f"must be one of {_ROPE_ATTEND_MODES}")
        mcl = self.model_context_length
        if mcl is not None and (not is_int(mcl) or mcl < 1):
            fail("model_context_length", mcl, "must be None or an integer >= 1")


# Entries of one mask row (chunks per query block and head group) at most. A mask is as wide as
# the budgets whatever the context: rows of every length stack into one batch, and a reused mask
# keeps its shape while decode reads more keys each step (capping the width by the key count
# would change it between steps). The Triton attention kernel loads a final row as one block, at
# most Triton's 2**20 elements (TRITON_MAX_TENSOR_NUMEL: past it, a compile error deep inside);
# the stage inputs a mask keeps get the same bound (4 MiB a row).
MAX_MASK_ROW = 1 << 20


def _mask_rows(config: HiPConfig):
    """(field, entry label, tokens, chunk) of each mask row a config makes: stage s > 0 scores
    ``stage_budgets[s]`` tokens in chunks of ``chunk_sizes[s]``, the final mask keeps ``budget``
    (``dense_layer_budget``) tokens in chunks of the last size."""
    for s in range(1, config.n_stages):
        yield "stage_budgets", f"entry {s}: ", config.stage_budgets[s], config.chunk_sizes[s]
    for field in ("budget", "dense_layer_budget"):
        yield field, "", getattr(config, field), config.chunk_size


PRESETS: dict[str, HiPConfig] = {
    # The paper's defaults (arXiv 2502.08910, and the public reference's).
    "paper": HiPConfig(),
    # Half the keys read per step: smaller window and budget, rarer refreshes.
    "fast": HiPConfig(window=512, chunk_sizes=(128, 32, 8), stage_budgets=(None, 16384, 4096),
                      budget=1024, dense_layer_budget=2048, refresh_intervals=(64, 32, 16)),
    # Twice the budget, finer query pooling, more frequent refreshes.
    "accurate": HiPConfig(window=2048, stage_budgets=(None, 65536, 16384), stage_strides=(2, 2, 1),
                          budget=4096, dense_layer_budget=8192, refresh_intervals=(16, 8, 4)),
    # Scaled down for small models with short trained contexts (the built-in model).
    "tiny": HiPConfig(sink=32, window=128, block_size_q=32, chunk_sizes=(32, 8, 2),
                      stage_budgets=(None, 512, 128), stage_strides=(2, 2, 1), budget=64,
                      dense_layers=(0,), dense_layer_budget=128, refresh_intervals=(16, 8, 4),
                      dense_threshold=0),
}


# refresh_lag tabulates one period of the refresh schedule (its lcm) per schedule.
_MAX_LAG_PERIOD = 1 << 16


@functools.lru_cache(maxsize=64)
def _refresh_counts(intervals: tuple[int, ...]) -> tuple[int, ...]:
    """Refresh steps in [1, t] for t = 1 .. lcm(intervals), the schedule's period."""
    counts, n = [], 0
    for t in range(1, math.lcm(*intervals) + 1):
        n += any(t % i == 0 for i in intervals)
        counts.append(n)
    return tuple(counts)


def _refreshes_upto(intervals: tuple[int, ...], step: int) -> int:
    per = _refresh_counts(intervals)     # per[t - 1]: refreshes in [1, t], over one period
    full, rest = divmod(max(step, 0), len(per))
    return full * per[-1] + (per[rest - 1] if rest else 0)


@functools.lru_cache(maxsize=64)
def _pending_slots(intervals: tuple[int, ...], lag: int) -> int:
    """``HiPConfig.pending_slots``, worked out once per schedule: it scans a whole period
    (lcm(intervals) steps: 2,100 for (60, 25, 7), 2 ms) and eager decode asks for it twice a step."""
    upto = functools.partial(_refreshes_upto, intervals)
    return 1 + max(upto(t) - upto(t - lag) for t in range(1, len(_refresh_counts(intervals)) + lag + 1))


def descent_levels(chunk: int, levels: int | None = None) -> int:
    """Levels of a hierarchical top-1 over ``chunk``-token chunks: log2(chunk), down to one token,
    or at most ``levels`` (``HiPConfig.probe_levels``)."""
    full = chunk.bit_length() - 1
    return full if levels is None else min(full, levels)


def parse_overrides(items: Sequence[str]) -> dict:
    """``FIELD=VALUE`` strings (the CLI's ``--hip``) -> HiPConfig field overrides. Values are
    Python literals (``3``, ``None``, ``(256, 32, 8)``, ``'exact'``) or bare words (``exact``);
    the config validates them when it is made."""
    fields = [f.name for f in dataclasses.fields(HiPConfig)]
    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not text.strip():
            raise ValueError(f"--hip {item!r}: write FIELD=VALUE, e.g. --hip stage0_levels=3")
        if name not in fields:
            raise ValueError(f"--hip {item!r}: HiPConfig has no field {name!r}; its fields: {', '.join(fields)}")
        if name in out:   # the last one silently won
            raise ValueError(f"--hip {name} is given twice ({name}={out[name]!r} and {item!r}): give it once")
        try:   # the value's type (a dict, a set) is HiPConfig's to check, like every other field's value
            out[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[name] = text.strip()      # a bare word: a mode name
    return out
