"""The end-to-end demo: teach Keisei's test network the rules of Shogi, checkpointing as it goes.

It trains on positions from random legal self-play (cshogi) with a *legality objective*: the
policy target is uniform over the legal moves, so the probability mass the policy puts on legal
moves ("legal mass") climbs from ~0 towards 1. Along the way it uses the whole lifecycle:
``resume`` (run it twice: the second run continues), ``capture`` → ``Checkpointer`` (durable
saves on an interval, retention), ``save_final_model``, publishing to W&B (offline by default),
the checkpoint table and ``analyze``.

Everything that decides the run — weights, optimizer, the batch sampler's generator, the global
RNGs, the step it trains to and whether the target stops it — is in each checkpoint, so a run
interrupted at any point (Ctrl-C, or killed) resumes exactly from its last checkpoint: it stops
at the same step with the same weights as a run never interrupted. Ctrl-C lets the step in
progress finish and saves it (a second Ctrl-C interrupts at once, saving nothing); the target
is checked only every ``eval_every`` steps, a resumed run included.

A run trains to ``steps`` (default :data:`DEFAULT_STEPS`) or until the training pool's legal
mass reaches the target, then saves its final state marked complete. Running it again on a
complete run trains nothing — unless ``steps`` is given beyond the step it ended at: then it
trains on from that last checkpoint to ``steps`` (a target already reached does not stop it,
nor does it after an interruption). A run resumes only from its own directory's checkpoints.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keisei_fn.capture import capture, restore_
from keisei_fn.errors import SpecError
from keisei_fn.nets import build_model
from keisei_fn.paths import RunPath
from keisei_fn.spec import ModelSpec
from keisei_fn.store.checkpointer import Checkpointer
from keisei_fn.store.checkpoints import save_final_model, save_state
from keisei_fn.store.resume import resume
from keisei_fn.store.retention import RetentionPolicy

__all__ = ["DEFAULT_STEPS", "DemoConfig", "DemoResult", "legal_mass", "legality_loss", "run_demo"]

Print = Callable[[str], None]

#: The step limit of a run when ``DemoConfig.steps`` is None.
DEFAULT_STEPS = 3000


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Settings of the demo run (defaults: under 2 minutes on 2 CPU cores).

    Args:
        run_dir: where checkpoints go (a second run with the same directory resumes).
        steps: train to this step (optimizer steps in all, across resumes); None: the step an
            interrupted run was training to, else :data:`DEFAULT_STEPS`, and a complete run
            stays complete. Given beyond the step a complete run ended at, it trains on from
            there.
        target_legal_mass: stop once the training pool's legal mass reaches this.
        seed: seeds the network, the position pools and the batch sampler.
        pool_size: training positions; heldout_size: positions never trained on.
        batch_size, lr: Adam on the legality objective.
        eval_every: steps between legal-mass measurements.
        checkpoint_every: steps between checkpoints; keep_last: retention.
        wandb: "offline" (default), "online" or "disabled".
    """

    run_dir: Path = Path("runs/demo")
    steps: int | None = None
    target_legal_mass: float = 0.9
    seed: int = 0
    pool_size: int = 512
    heldout_size: int = 256
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 25
    checkpoint_every: int = 100
    keep_last: int = 3
    wandb: str = "offline"
    spec: ModelSpec = field(default_factory=lambda: ModelSpec(model_type="testmodel"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        for name in (
            *(("steps",) if self.steps is not None else ()),
            "pool_size",
            "heldout_size",
            "batch_size",
            "eval_every",
            "checkpoint_every",
            "keep_last",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 < self.target_legal_mass <= 1.0:
            raise SpecError(f"target_legal_mass must be in (0, 1], got {self.target_legal_mass}")
        if self.wandb not in ("offline", "online", "disabled"):
            raise SpecError(f"wandb must be offline, online or disabled, got {self.wandb!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """How the demo ended.

    Attributes:
        step: the step the run is at now.
        target_step: the step it trained towards (its step when there was nothing to train).
        trained: whether this call trained (False: the run was already complete).
    """

    step: int
    target_step: int
    trained: bool
    resumed_from: RunPath | None
    train_legal_mass: float
    heldout_legal_mass: float
    reached_target: bool
    seconds: float
    publish_status: tuple[str, ...]


def legality_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Cross-entropy to the uniform distribution over legal moves (mean over the batch)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    per_row = -(log_probs * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    return per_row.mean()


def legal_mass(model: nn.Module, obs: Tensor, masks: Tensor, *, batch: int = 256) -> float:
    """Mean probability the policy puts on legal moves over a set of positions."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(obs), batch):
            logits, _ = model(obs[i : i + batch])
            probs = torch.softmax(logits.float(), dim=-1)
            total += float((probs * masks[i : i + batch]).sum())
    model.train(was_training)
    return total / len(obs)


def _pool(n: int, seed: int) -> tuple[Tensor, Tensor]:
    from keisei_fn import shogi

    boards = shogi.random_positions(n, seed=seed, stride=3)
    return shogi.encode_observations(boards), shogi.legal_masks(boards).float()


@contextmanager
def _deferred_ctrl_c() -> Iterator[Callable[[], bool]]:
    """While inside, the first Ctrl-C only sets a flag (the returned callable reads it), so that
    the loop ends the step in progress and saves it — a step cut short would leave the sampler,
    the optimizer or the weights half-way, which no resume can make exact. A second Ctrl-C
    raises KeyboardInterrupt at once. Off the main thread, or when SIGINT has a handler other
    than Python's default, nothing changes (and the flag stays False)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return
    requested = False

    def request(signum: int, frame: object) -> None:
        nonlocal requested
        requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, request)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _recorded_step(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _recorded_mass(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def run_demo(config: DemoConfig, *, say: Print = print, progress: bool | None = None) -> DemoResult:
    """Train, checkpoint, resume, publish and analyse — the README's main job.

    Args:
        config: the run's settings.
        say: where progress lines go.
        progress: show a progress bar (default: when stdout is a terminal).

    Returns:
        How it ended.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    spec = config.spec
    torch.manual_seed(config.seed)
    model = build_model(spec, seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    sampler = torch.Generator().manual_seed(config.seed)
    train_obs, train_masks = _pool(config.pool_size, config.seed)
    held_obs, held_masks = _pool(config.heldout_size, config.seed + 1_000_003)

    # Only the run's own checkpoints: never a copy of a parent directory's run.
    resumed = resume(config.run_dir, search_parent=False)
    step = 0
    if resumed is not None:
        restore_(resumed.state, model, optimizer, generators={"batches": sampler})
        step = resumed.state.step
        say(f"resumed from {resumed.path} at step {step}")
    else:
        say(f"fresh start in {config.run_dir} (no checkpoint to resume)")
    ended = dict(resumed.state.extra) if resumed is not None else {}
    completed = bool(ended.get("completed"))
    recorded_limit = None if completed else _recorded_step(ended.get("target_step"))
    if config.steps is not None:
        limit = config.steps
    else:  # an interrupted run goes on to the step it was training to
        limit = recorded_limit if recorded_limit is not None else DEFAULT_STEPS
    # Between two measurements (off the eval_every grid) an interrupted run held the last one,
    # as its saves record: so does its resume, and its saves record the same.
    train_mass = _recorded_mass(ended.get("train_legal_mass"))
    held_mass = _recorded_mass(ended.get("heldout_legal_mass"))
    if completed or step % config.eval_every == 0 or train_mass is None or held_mass is None:
        train_mass = legal_mass(model, train_obs, train_masks)
        held_mass = legal_mass(model, held_obs, held_masks)
    if completed:
        continuing = config.steps is not None and config.steps > step
        # A target already reached when a complete run trains on does not stop it.
        stop_at_target = not (continuing and train_mass >= config.target_legal_mass)
    else:
        # A run interrupted while training on past its target goes on past it.
        continuing = ended.get("ignore_target") is True
        stop_at_target = not continuing
    training = continuing or not completed
    if not training:
        why = ended.get("stopped") or (
            "target legal mass reached"
            if train_mass >= config.target_legal_mass
            else "step limit reached"
        )
        say(
            f"this run is already complete at step {step} ({why}): pass --steps N > {step} "
            f"to train on, or delete {config.run_dir} to start over"
        )
        limit = step
    else:
        params = sum(p.numel() for p in model.parameters())
        say(
            f"model {spec.model_type} ({params:,} parameters), {config.pool_size} training "
            f"positions + {config.heldout_size} held-out from random self-play (seed "
            f"{config.seed}); checkpoint every {config.checkpoint_every} steps, keep the last "
            f"{config.keep_last}"
        )
        if not stop_at_target:
            say(
                f"training on from step {step} to step {limit} (target legal mass "
                f"{config.target_legal_mass} already reached: it does not stop this run)"
            )
        else:
            say(
                f"training {f'on from step {step} ' if continuing else ''}to step {limit}, or "
                f"until the legal mass reaches {config.target_legal_mass} (checked every "
                f"{config.eval_every} steps; ETAs are to step {limit}: an upper bound)"
            )

    checkpointer = Checkpointer(
        run_dir=config.run_dir,
        interval=config.checkpoint_every,
        retention=RetentionPolicy(keep_last=config.keep_last),
    )
    last_saved = first_step = step

    def snapshot(**extra: Any) -> Any:
        return capture(
            spec,
            model,
            optimizer,
            step=step,
            generators={"batches": sampler},
            extra={
                "train_legal_mass": train_mass,
                "heldout_legal_mass": held_mass,
                # what a resume of this checkpoint trains to, and whether the target stops it
                "target_step": limit,
                **({} if stop_at_target else {"ignore_target": True}),
                **extra,
            },
        )

    bar = tqdm(
        total=limit,
        initial=step,
        desc=f"{'up ' if stop_at_target else ''}to step {limit}",
        disable=not progress if progress is not None else None,
        unit="step",
        dynamic_ncols=True,
    )
    loop_started = time.perf_counter()
    interrupted = False
    saved_name = None
    with _deferred_ctrl_c() as ctrl_c:
        try:
            while (
                training
                and step < limit
                # on the eval_every grid only, right after a resume too: where a run never
                # interrupted checks it
                and not (
                    stop_at_target
                    and step % config.eval_every == 0
                    and train_mass >= config.target_legal_mass
                )
            ):
                batch = torch.randint(len(train_obs), (config.batch_size,), generator=sampler)
                logits, _ = model(train_obs[batch])
                loss = legality_loss(logits, train_masks[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                step += 1
                bar.update(1)
                if step % config.eval_every == 0:
                    train_mass = legal_mass(model, train_obs, train_masks)
                    held_mass = legal_mass(model, held_obs, held_masks)
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}",
                        train=f"{train_mass:.3f}",
                        heldout=f"{held_mass:.3f}",
                    )
                    if bar.disable:
                        rate = (time.perf_counter() - loop_started) / (step - first_step)
                        eta = _duration(rate * (limit - step))
                        say(
                            f"step {step:5d}/{limit}  loss {loss.item():.3f}  legal mass: "
                            f"train {train_mass:.3f}  held-out {held_mass:.3f}  "
                            f"ETA {'<= ' if stop_at_target else ''}{eta}"
                        )
                result = checkpointer.maybe_save(snapshot, step=step, last_saved=last_saved)
                if result.status == "saved" and result.meta is not None:
                    say(f"saved {result.meta.name} ({result.meta.weights_size / 1e6:.1f} MB)")
                    saved_name = result.meta.name
                last_saved = result.last_saved
                if ctrl_c():  # a whole step: save it below
                    interrupted = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: a step cut short is no state to resume
            bar.close()
            say(
                "\ninterrupted mid-step: not saved; run the same command again to "
                + (f"resume from checkpoint_ts{last_saved}" if last_saved else "start over")
            )
            raise
    bar.close()
    if interrupted:
        if step > last_saved:
            saved_name = save_state(snapshot(), config.run_dir).name
        say(f"\ninterrupted: saved {saved_name}; run the same command again to resume")
        raise KeyboardInterrupt
    if training and step % config.eval_every:  # measure the final weights
        train_mass = legal_mass(model, train_obs, train_masks)
        held_mass = legal_mass(model, held_obs, held_masks)
    reached = train_mass >= config.target_legal_mass
    publish_status: tuple[str, ...] = ()
    if training:
        stopped = (
            "target legal mass reached"
            if stop_at_target and reached
            else f"step limit {limit} reached"
        )
        final = snapshot(completed=True, stopped=stopped)
        final_meta = save_state(final, config.run_dir, kind="final", overwrite=True)
        model_meta = save_final_model(final, config.run_dir)
        say(f"final checkpoint {final_meta.name}, final model {model_meta.name}")
        publish_status = _publish(config, (final_meta, model_meta), say)
    return DemoResult(
        step=step,
        target_step=limit,
        trained=training,
        resumed_from=resumed.path if resumed is not None else None,
        train_legal_mass=train_mass,
        heldout_legal_mass=held_mass,
        reached_target=reached,
        seconds=time.perf_counter() - started,
        publish_status=publish_status,
    )


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _publish(config: DemoConfig, metas: tuple[Any, ...], say: Print) -> tuple[str, ...]:
    if config.wandb == "disabled":
        say("W&B disabled: publishing skipped")
        return ()
    from keisei_fn.publish import publish, wandb_run

    statuses = []
    with wandb_run(
        mode=config.wandb,
        name=config.run_dir.name,
        directory=config.run_dir,
        config={"spec": config.spec.to_json(), "lr": config.lr, "batch_size": config.batch_size},
    ) as run:
        for meta in metas:
            result = publish(meta, run_name=config.run_dir.name, run=run)
            say(f"W&B: {result}")
            statuses.append(result.status)
    return tuple(statuses)
