"""A Hypothesis state machine over one run directory: saves (periodic, final, replacing),
crashes mid-save (the debris a killed save or prune can leave: temp files, a payload no sidecar
names beside the committed checkpoint, weights without a sidecar, a torn sidecar), pending
publications, pruning, loads.

After every step: ``latest_checkpoint`` is the highest-step valid saved state and loads
bit-exactly to what was saved; ``list_checkpoints`` lists exactly the committed checkpoints —
nothing incomplete, nothing lost.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keisei_fn import (
    RetentionPolicy,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    prune,
    save_state,
)
from keisei_fn.codec import dumps, encode_state
from keisei_fn.errors import CheckpointExistsError
from keisei_fn.store import append_ledger, scan_run_dir
from keisei_fn.testing import assert_states_equal, train_states

STEPS = st.integers(1, 12)
STATES = train_states(specs=st.none(), steps=st.just(1))
MAX_BYTES = st.none() | st.integers(1, 20_000)
# keep_last=None keeps every checkpoint (other keep rules beside it only warn)
POLICIES = st.builds(RetentionPolicy, max_bytes=MAX_BYTES) | st.builds(
    RetentionPolicy,
    keep_last=st.integers(0, 3),
    keep_every=st.none() | st.sampled_from([2, 4]),
    max_bytes=MAX_BYTES,
)


def _name(step: int) -> str:
    return f"checkpoint_ts{step}"


def _same(a: TrainState, b: TrainState) -> bool:
    """Whether the store sees the two states as identical (same sidecar state, same weights)."""
    ea, eb = encode_state(a), encode_state(b)
    if dumps(ea.header) != dumps(eb.header) or ea.tensors.keys() != eb.tensors.keys():
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(_raw(x), _raw(y))
        for x, y in zip(ea.tensors.values(), eb.tensors.values(), strict=True)
    )


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


class RunDirMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="keisei_fn-machine-")
        self.run_dir = Path(self._tmp.name) / "run"
        self.scratch = Path(self._tmp.name) / "scratch"
        self.saved: dict[int, TrainState] = {}  # committed checkpoints by step
        self.weights: dict[int, str] = {}  # the weights file each committed sidecar names
        self.finals: set[int] = set()
        self.pending: set[int] = set()

    def teardown(self) -> None:
        self._tmp.cleanup()

    # --- rules --------------------------------------------------------------------------------

    @rule(state=STATES, step=STEPS, final=st.booleans(), overwrite=st.booleans())
    def save(self, state: TrainState, step: int, final: bool, overwrite: bool) -> None:
        state = state.replace(step=step)
        kind = "final" if final else "periodic"
        old = self.saved.get(step)
        if old is not None and not _same(old, state) and not overwrite:
            try:
                save_state(state, self.run_dir, kind=kind)
            except CheckpointExistsError:
                return
            raise AssertionError("a different state at a saved step was not refused")
        meta = save_state(state, self.run_dir, kind=kind, overwrite=overwrite)
        self.weights[step] = meta.weights_file
        if old is not None and _same(old, state):
            assert meta.kind == ("final" if final or step in self.finals else "periodic")
            self.finals |= {step} if final else set()
            return
        self.saved[step] = state
        self.finals = (self.finals | {step}) if final else (self.finals - {step})
        assert meta.kind == kind

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    def resave_identical(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.saved)))
        before = {p.name: p.stat().st_mtime_ns for p in self.run_dir.iterdir()}
        save_state(self.saved[step], self.run_dir)
        assert {p.name: p.stat().st_mtime_ns for p in self.run_dir.iterdir()} == before

    @rule(
        state=STATES,
        step=STEPS,
        debris=st.sampled_from(["temp", "payload", "orphan", "torn_sidecar"]),
    )
    def crash_mid_save(self, state: TrainState, step: int, debris: str) -> None:
        """Leave what a save (or prune) killed at ``step`` can leave (written directly, as a
        crash would)."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        meta = save_state(state.replace(step=step), self.scratch)
        weights, sidecar = meta.weights_path.read_bytes(), meta.sidecar_path.read_bytes()
        target = self.run_dir / _name(step)
        payload = self.run_dir / meta.weights_file  # a fresh generation name of this step
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if debris == "temp":  # killed while writing a temp file: nothing visible changes
            suffix = secrets.token_hex(6)
            Path(f"{target.parent}/.{payload.name}.{suffix}.tmp").write_bytes(
                weights[: len(weights) // 2]
            )
            return
        if debris == "payload":  # killed before the commit: what was committed stays
            payload.write_bytes(weights)
            return
        # killed after uncommitting (a prune) or with a torn sidecar: the step is not committed
        Path(f"{target}.json").unlink(missing_ok=True)
        payload.write_bytes(weights)
        if debris == "torn_sidecar":
            Path(f"{target}.json").write_bytes(sidecar[: len(sidecar) // 2])
        self.saved.pop(step, None)
        self.weights.pop(step, None)
        self.finals.discard(step)

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    def publish_pending(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.saved)))
        meta = next(m for m in list_checkpoints(self.run_dir) if m.step == step)
        append_ledger(
            self.run_dir,
            {"event": "pending", "artifact": f"run-{meta.name}", "digest": meta.weights_digest,
             "checkpoint": meta.name},
        )  # fmt: skip
        self.pending.add(step)

    @rule(policy=POLICIES)
    def prune(self, policy: RetentionPolicy) -> None:
        prune(self.run_dir, policy)
        listed = {m.step for m in list_checkpoints(self.run_dir)}
        assert listed <= set(self.saved), "prune made something valid appear"
        if self.saved:
            assert max(self.saved) in listed, "prune deleted the newest checkpoint"
        assert self.finals <= listed, "prune deleted a final checkpoint"
        assert self.pending & set(self.saved) <= listed, "prune deleted a pending publication"
        scan = scan_run_dir(self.run_dir)
        assert not scan.leftovers and not scan.invalid, "prune left incomplete files"
        self.saved = {s: st_ for s, st_ in self.saved.items() if s in listed}
        self.weights = {s: w for s, w in self.weights.items() if s in listed}
        self.finals &= listed

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.saved)))
        assert_states_equal(self.saved[step], load_state(self.run_dir / _name(step)))

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def latest_is_the_highest_valid_saved_step(self) -> None:
        latest = latest_checkpoint(self.run_dir)
        if not self.saved:
            assert latest is None
            return
        top = max(self.saved)
        assert latest == self.run_dir / self.weights[top]
        assert_states_equal(self.saved[top], load_state(self.run_dir))

    @invariant()
    def exactly_the_committed_checkpoints_are_listed(self) -> None:
        metas = list_checkpoints(self.run_dir)
        assert [m.step for m in metas] == sorted(self.saved)
        assert {m.step for m in metas if m.kind == "final"} == self.finals


RunDirMachine.TestCase.settings = settings(deadline=None, stateful_step_count=20)
TestRunDir = RunDirMachine.TestCase
