"""``DecodeState``: what decode carries from step to step -- each layer's sparse masks (batched
over rows), each row's decode step (its own refresh schedule) and, with ``refresh_lag``, the masks
pruned for later steps, filed per row in ``HiPConfig.pending_slots`` slots."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import HiPMask
from ..config import HiPConfig
from ..models.llama import AttentionCall


@dataclass
class DecodeState:
    """What decode carries from step to step: per-layer sparse masks (batched over rows) and each
    row's decode step, which sets its own refresh schedule — so a row's tokens do not depend on
    when its batch neighbours joined."""

    backend: str
    masks: list = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    kernel: str = "auto"
    # refresh_lag > 0: per layer, HiPConfig.pending_slots masks: the one a row pruned j-th
    # (HiPConfig.refreshes_upto) in slot j % slots, its first step's in slot 0.
    pruned: list = field(default_factory=list)

    def refresh_stages(self, hip: HiPConfig) -> int | list[int]:
        """This step's first pruning stage to rerun, one per row (an int when all rows agree).
        With ``refresh_lag`` only a row's first step prunes now (``deferred_stages`` the rest)."""
        stages = [hip.refresh_stage(s) if s == 0 or not hip.refresh_lag else hip.n_stages for s in self.steps]
        return _one_or_all(stages)

    def deferred_stages(self, hip: HiPConfig) -> int | list[int]:
        """refresh_lag > 0: the first stage each row prunes this step for ``refresh_lag`` steps later."""
        return _one_or_all([hip.refresh_stage(s) if s else hip.n_stages for s in self.steps])

    def taking_effect(self, hip: HiPConfig) -> bool | list[bool]:
        """refresh_lag > 0: which rows attend from this step with the mask pruned ``refresh_lag`` steps ago."""
        return _one_or_all([_takes(s, hip) for s in self.steps])

    def call(self, hip: HiPConfig) -> AttentionCall:
        """This step's ``AttentionCall``. With ``refresh_lag`` the masks pruned ``refresh_lag``
        steps ago take effect first (rows of ``taking_effect``), and ``call.pruned`` holds the
        masks this step's deferred pruning starts from (``keep_pruned`` files what it makes)."""
        call = AttentionCall(backend=self.backend, masks=self.masks, refresh_stage=self.refresh_stages(hip),
                             kernel=self.kernel)
        if self.backend != "hip" or not hip.refresh_lag:
            return call
        slots, lag = hip.pending_slots, hip.refresh_lag
        if not self.pruned:
            self.pruned = [[None] * slots for _ in self.masks]
        taking = [hip.refreshes_upto(s - lag) % slots if _takes(s, hip) else None for s in self.steps]
        self.masks[:] = [_from_slots(m, kept, taking) for m, kept in zip(self.masks, self.pruned)]
        newest = [(hip.refreshes_upto(s) - 1) % slots if _refreshes(s, hip) else None for s in self.steps]
        call.pruned = [_from_slots(m, kept, newest) for m, kept in zip(self.masks, self.pruned)]
        call.defer_stage, call.fresh = self.deferred_stages(hip), any(t is not None for t in taking)
        return call

    def keep_pruned(self, call: AttentionCall, hip: HiPConfig):
        """After a step: each row's newly pruned mask into its slot (a first step's into slot 0)."""
        if call.pruned is None:
            return
        slots = hip.pending_slots
        dest = [hip.refreshes_upto(s) % slots if s == 0 or _refreshes(s, hip) else None for s in self.steps]
        for kept, new in zip(self.pruned, call.pruned):
            _into_slots(kept, new, dest)

    def admit(self, row: int, batch: int):
        """Start row ``row`` of ``batch`` on a new sequence: its refresh schedule restarts, so its
        first decode step prunes from scratch with its own query. (Starting from the prompt's
        last query block instead -- queries pooled over 32-64 prompt rows -- missed the needle
        that a fresh one-token query finds: passkey at 32x the built-in model's context went from
        2/6 to 6/6 in scripts/diagnose_builtin.py.)"""
        if not self.steps:
            self.steps = [0] * batch
        self.steps[row] = 0


def _refreshes(step: int, hip: HiPConfig) -> bool:
    """Whether a row's decode step ``step`` reruns pruning on the schedule (step 0 prunes from scratch)."""
    return step > 0 and hip.refresh_stage(step) < hip.n_stages


def _takes(step: int, hip: HiPConfig) -> bool:
    """refresh_lag > 0: whether a row's step ``step`` attends with the mask pruned ``refresh_lag`` steps ago."""
    return _refreshes(step - hip.refresh_lag, hip)


def _one_or_all(values: list):
    """One value when every row agrees, else the list (a row-mixed step)."""
    return values[0] if len(set(values)) == 1 else values


def _rows(slots: list, r: int, device) -> torch.Tensor:
    return torch.tensor([x == r for x in slots], device=device)


def _from_slots(default: HiPMask | None, kept: list, slots: list) -> HiPMask | None:
    """Per row b the row of ``kept[slots[b]]``, of ``default`` where ``slots[b]`` is None."""
    out = default
    for r in sorted(set(slots) - {None}):
        if kept[r] is not None:
            whole = out is None or all(x == r for x in slots)
            out = kept[r] if whole else out.where(_rows(slots, r, out.starts.device), kept[r])
    return out


def _into_slots(kept: list, new: HiPMask | None, slots: list):
    """Row b of ``new`` into ``kept[slots[b]]`` (None: nowhere)."""
    if new is not None:
        for r in sorted(set(slots) - {None}):
            whole = kept[r] is None or all(x == r for x in slots)
            kept[r] = new if whole else kept[r].where(_rows(slots, r, new.starts.device), new)
