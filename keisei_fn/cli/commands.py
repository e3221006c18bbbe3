"""The commands of ``keisei-fn``: each is a thin call into the library plus printing.

Every command takes the parsed ``argparse.Namespace`` and returns an exit code. A path that
does not exist is a user error (``FileNotFoundError`` or a ``KeiseiFnError``, which ``main``
prints as one line, exit 2), raised before anything is written or a W&B run is started.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from keisei_fn.average import AVERAGE_KEY, average_summary
from keisei_fn.cli.table import human_age, human_bytes, render_table
from keisei_fn.info import model_info
from keisei_fn.meta import CheckpointMeta
from keisei_fn.paths import RunPath, run_path
from keisei_fn.precision import precision_policy
from keisei_fn.spec import TEST_MODEL_TYPES, ModelSpec
from keisei_fn.state import thaw

#: ``convert --kind`` → ``import_legacy``'s kind.
CONVERT_KINDS = {"checkpoint": "periodic", "final": "final", "final-model": "final_model"}


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def _spec_from_args(args: argparse.Namespace) -> ModelSpec | None:
    """A spec from Keisei's CLI names, or None when no spec option was given."""
    names = ("model", "input_features", "tower_depth", "tower_width", "se_ratio")
    if all(getattr(args, n, None) is None for n in names):
        return None
    return ModelSpec.from_config(None, args)


def _existing_run_dir(path: str | Path) -> RunPath:
    """The run directory ``path`` names, which must exist.

    Raises:
        FileNotFoundError: it is not an existing directory.
    """
    from keisei_fn.store import directory_exists

    run_dir = run_path(path)
    if not directory_exists(run_dir):
        raise FileNotFoundError(f"no run directory {run_dir}")
    return run_dir


def _publish_status(run_dir: RunPath) -> dict[str, str]:
    """Checkpoint name → its latest publication event (none, with a warning, when the ledger
    cannot be read: the listing goes on)."""
    from keisei_fn.errors import KeiseiFnError
    from keisei_fn.store.ledger import read_ledger

    status: dict[str, str] = {}
    try:
        records = read_ledger(run_dir)
    except KeiseiFnError as exc:
        print(f"warning: publication status unknown: {exc}", file=sys.stderr)
        return status
    for record in records:
        if record.get("checkpoint"):
            status[record["checkpoint"]] = record.get("event", "?")
    return status


def cmd_ls(args: argparse.Namespace) -> int:
    """A table of a run directory's checkpoints, including invalid and incomplete ones; a
    ``health`` column when the health gate checked any of them."""
    from keisei_fn.store import scan_run_dir, stored_size, verify_checkpoint
    from keisei_fn.store.bundle import bundle_stem

    run_dir = _existing_run_dir(args.run_dir)
    if bundle_stem(run_dir) is not None:
        print(f"{run_dir} is an export bundle, not a run directory: `keisei-fn info {run_dir}`")
        return 0
    scan = scan_run_dir(run_dir)
    published = _publish_status(run_dir)
    rows = []
    for meta in scan.valid:
        integrity = "listed"
        if args.verify:
            try:
                verify_checkpoint(meta.path)
                integrity = "verified"
            except Exception as exc:
                integrity = f"CORRUPT: {type(exc).__name__}"
        rows.append(
            [
                meta.name,
                str(meta.step),
                f"{meta.kind} ({meta.world_size} shards)" if meta.sharded else meta.kind,
                human_bytes(meta.total_bytes),
                human_age(meta.created),
                integrity,
                published.get(meta.name, "-"),
            ]
        )
    for path, error in scan.invalid:
        rows.append([path.name, "?", "?", "?", "?", f"INVALID: {type(error).__name__}", "-"])
    for path, reason in scan.unreadable:
        rows.append([path.name, "?", "?", "?", "?", f"UNREADABLE: {type(reason).__name__}", "-"])
    for path in scan.leftovers:
        try:
            size = "-" if (found := stored_size(path)) is None else human_bytes(found)
        except OSError:  # removed since the scan (pruned, or committed and replaced)
            continue
        rows.append([path.name, "?", "?", size, "?", "leftover", "-"])
    if not rows:
        print(f"{run_dir}: no checkpoints")
        return 0
    header = ["name", "step", "kind", "size", "age", "integrity", "publish"]
    if any(meta.health is not None for meta in scan.valid):
        marks = [meta.health_mark for meta in scan.valid]
        marks += ["?"] * (len(rows) - len(marks))  # invalid, unreadable, leftover
        rows = [[*row, mark] for row, mark in zip(rows, marks, strict=True)]
        header.append("health")
    print(render_table(header, rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Spec, model info, stats and tensors of a checkpoint (a run directory: its final model,
    else its latest checkpoint) — or of a spec given by options."""
    if args.path is None:
        spec = _spec_from_args(args) or ModelSpec()
        precision = precision_policy(args.device, mixed_precision=args.mixed_precision or False)
        info = model_info(spec, precision=precision, device=args.device)
        if args.json:
            _print_json(info)
        else:
            _print_spec(spec, info)
        return 0
    from keisei_fn.store.bundle import bundle_stem
    from keisei_fn.store.listing import read_listed
    from keisei_fn.store.locate import resolve_checkpoint

    if (bundle := bundle_stem(args.path)) is not None:
        return _bundle_info(bundle, as_json=args.json)
    meta, sidecar = read_listed(resolve_checkpoint(args.path))
    data: dict[str, Any] = {
        "name": meta.name,
        "path": str(meta.path),
        "kind": meta.kind,
        "step": meta.step,
        "episodes": meta.episodes,
        "stats": meta.stats.to_json(),
        "created": meta.created,
        "versions": dict(meta.versions),
        "format_version": meta.format_version,
        "migrated": sidecar.get("migrated"),
        "weights": {"size": meta.weights_size, "digest": meta.weights_digest},
        "tensors": len(meta.tensors),
        "spec": meta.spec.to_json() if meta.spec else None,
        "model_info": model_info(meta.spec) if meta.spec else None,
        "health": None if meta.health is None else list(meta.health),
        "average": (
            thaw(meta.extra[AVERAGE_KEY]) if average_summary(meta.extra) is not None else None
        ),
    }
    if args.json:
        data["tensors"] = {k: {"dtype": d, "shape": list(s)} for k, (d, s) in meta.tensors.items()}
        _print_json(data)
        return 0
    print(f"checkpoint     {meta.path}  ({meta.kind}, step {meta.step}, {meta.episodes} episodes)")
    print(f"created        {meta.created}  ({human_age(meta.created)} ago)")
    print(
        f"stats          {meta.stats.black_wins} black wins, {meta.stats.white_wins} white "
        f"wins, {meta.stats.draws} draws"
    )
    print(f"weights        {human_bytes(meta.weights_size)}  {meta.weights_digest[:23]}…")
    if meta.health is not None:
        print(f"health         {meta.health_summary}")
    print(
        f"written by     {_writer(meta.versions)}; format {meta.format_version}"
        + _migration(sidecar.get("migrated"))
    )
    by_part: dict[str, int] = {}
    for name in meta.tensors:
        part = name.split("/", 1)[0]
        by_part[part] = by_part.get(part, 0) + 1
    print("tensors        " + ", ".join(f"{n} {part}" for part, n in sorted(by_part.items())))
    if (average := average_summary(meta.extra)) is not None:
        print(f"made as        {average}")
    if meta.spec and data["model_info"]:
        _print_spec(meta.spec, data["model_info"])
    else:
        print("spec           none (an arbitrary user model)")
    return 0


def _bundle_info(stem: RunPath, *, as_json: bool) -> int:
    """``info`` of an export bundle: its dtype, source, sizes and gate figures (the sidecar's
    and files' sizes checked; ``verify`` checks every byte)."""
    from keisei_fn.serve.compare import ComparisonReport
    from keisei_fn.store.bundle import read_bundle_meta

    bundle = read_bundle_meta(stem)
    record = thaw(bundle.export)
    if as_json:
        _print_json(
            {
                "bundle": str(bundle.directory),
                "dtype": bundle.dtype,
                "step": bundle.step,
                "created": bundle.created,
                "versions": dict(bundle.versions),
                "weights": {"size": bundle.weights_size, "digest": bundle.weights_digest},
                "onnx": {"size": bundle.onnx_size, "digest": bundle.onnx_digest}
                if bundle.onnx_file
                else None,
                "spec": bundle.spec.to_json(),
                "export": record,
            }
        )
        return 0
    source, sizes = record.get("source", {}), record.get("sizes", {})
    print(f"bundle         {bundle.directory}  ({bundle.dtype}, step {bundle.step})")
    print(f"created        {bundle.created}  ({human_age(bundle.created)} ago)")
    print(f"source         {source.get('path', '?')}  {str(source.get('weights_digest'))[:23]}…")
    print(
        f"weights        {human_bytes(bundle.weights_size)}  (the float32 model: "
        f"{human_bytes(int(sizes.get('source_model_bytes', 0)))})"
        + (f"; model.onnx {human_bytes(bundle.onnx_size)}" if bundle.onnx_file else "")
    )
    for key, label in (("gate", "gate"), ("onnx_gate", "onnx gate")):
        gate = record.get(key)
        if isinstance(gate, Mapping):
            print(f"{label:<15}{ComparisonReport(**gate['figures'])}")
    if record.get("forced"):
        print(f"FORCED despite {'; '.join(record.get('problems', []))}")
    print(f"written by     {_writer(bundle.versions)}")
    _print_spec(bundle.spec, model_info(bundle.spec))
    return 0


def _writer(versions: Mapping[str, Any]) -> str:
    """``keisei_fn 0.1.0, torch 2.5.1`` ("unknown" for a version a sidecar does not record)."""
    return ", ".join(f"{name} {versions.get(name, 'unknown')}" for name in ("keisei_fn", "torch"))


def _migration(migrated: Any) -> str:
    """`` (migrated from format 1 by keisei_fn 0.2.0, torch ...)``, or ``""``."""
    if not isinstance(migrated, Mapping):
        return ""
    versions = migrated.get("versions")
    by = _writer(versions if isinstance(versions, Mapping) else {})
    return f" (migrated from format {migrated.get('from_format_version', '?')} by {by})"


def _print_spec(spec: ModelSpec, info: dict[str, Any]) -> None:
    print(
        f"model          {spec.model_type}  depth {spec.tower_depth}  width {spec.tower_width}"
        f"  se_ratio {spec.se_ratio}"
    )
    print(
        f"features       {spec.input_features} ({spec.obs_shape[0]} planes), "
        f"{spec.num_actions} actions"
    )
    print(
        f"parameters     {info['parameters']:,} ({info['trainable_parameters']:,} trainable), "
        f"{info['state_dict_keys']} state_dict keys"
    )
    print(f"precision      {info['mixed_precision']['reason']}")


def _unhealthy_note(meta: CheckpointMeta) -> str:
    """What ``verify`` adds after an intact checkpoint the health gate marked unhealthy."""
    return "" if meta.healthy else f"  ({meta.health_mark}: never resumed or published)"


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify one checkpoint or every checkpoint of a run directory; exit 1 on a corrupt,
    invalid or unreadable checkpoint. Leftovers of an ordinary crash (temp files, payloads no
    sidecar names) are reported as leftovers, exit 0 — exit 1 with ``--strict``. A directory
    with nothing in it to verify is a user error (a wrong path, most likely): exit 2."""
    from keisei_fn.errors import CheckpointNotFoundError
    from keisei_fn.store.checkpoints import verify_checkpoint
    from keisei_fn.store.listing import is_run_dir, scan_run_dir

    path = run_path(args.path)
    if not is_run_dir(path):
        meta = verify_checkpoint(path)
        size = human_bytes(meta.weights_size)
        print(f"ok  {meta.name} (step {meta.step}, {size}){_unhealthy_note(meta)}")
        return 0
    scan = scan_run_dir(path)
    if not (scan.valid or scan.invalid or scan.unreadable or scan.leftovers):
        raise CheckpointNotFoundError(f"no checkpoints in {path}: nothing to verify")
    bad = 0
    for meta in scan.valid:
        try:
            verify_checkpoint(meta.path)
            print(f"ok       {meta.name}{_unhealthy_note(meta)}")
        except Exception as exc:
            bad += 1
            print(f"CORRUPT  {meta.name}: {exc}")
    for stem, error in scan.invalid:
        bad += 1
        print(f"INVALID  {stem.name}: {error}")
    for stem, reason in scan.unreadable:
        bad += 1
        print(f"UNREADABLE  {stem.name}: {reason}")
    for leftover in scan.leftovers:
        bad += args.strict
        print(f"LEFTOVER  {leftover.name}: no sidecar names it (prune removes it)")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Apply a retention policy (``--dry-run`` to only show the plan)."""
    from keisei_fn.errors import UnsupportedFormatError
    from keisei_fn.store.bundle import bundle_stem
    from keisei_fn.store.retention import RetentionPolicy, prune

    run_dir = _existing_run_dir(args.run_dir)
    if bundle_stem(run_dir) is not None:
        raise UnsupportedFormatError(f"{run_dir} is an export bundle, not a run directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = RetentionPolicy(
            keep_last=args.keep_last,
            keep_every=args.keep_every,
            keep_best=args.keep_best,
            keep_within=args.keep_within,
            keep_hourly=args.keep_hourly,
            keep_daily=args.keep_daily,
            max_bytes=args.max_bytes,
        )
    if caught:  # keep rules without --keep-last: they change nothing
        print(
            "note: without --keep-last every periodic checkpoint is kept; add --keep-last 0 "
            "to let the other rules decide",
            file=sys.stderr,
        )
    plan = prune(run_dir, policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name, reason in sorted(plan.keep.items()):
        print(f"keep          {name}  ({reason})")
    for name in plan.delete:
        print(f"{verb:<13} {name}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Import an original Keisei ``.pth`` checkpoint into a run directory (``--kind``: what
    to import it as; by default decided by the file name, see ``import_legacy``)."""
    from keisei_fn.store.legacy import import_legacy

    kind = CONVERT_KINDS[args.kind] if args.kind else None
    meta = import_legacy(args.pth, args.run_dir, spec=_spec_from_args(args), kind=kind)
    print(f"converted {args.pth} → {meta.weights_path} (step {meta.step}, {meta.kind})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one checkpoint (a run directory: its final model, else its latest checkpoint)
    to W&B, offline unless WANDB_MODE or --wandb says otherwise; W&B's files go under the run
    directory's ``wandb/`` unless WANDB_DIR is set. One line says what happened."""
    from keisei_fn.errors import SpecError
    from keisei_fn.publish import BestBy, publish, publishable, wandb_run
    from keisei_fn.store.locate import resolve_checkpoint

    if args.best_link_to and not args.best:
        raise SpecError("--best-link-to needs --best METRIC")
    best = None
    if args.best:
        metric, mode = args.best
        best = BestBy(metric, mode, link_to=args.best_link_to)
    meta = publishable(resolve_checkpoint(args.path))  # before any W&B run is started
    with wandb_run(
        mode=args.wandb, project=args.project, name=args.run_name, directory=meta.run_dir
    ) as run:
        result = publish(
            meta,
            run_name=args.run_name,
            run=run,
            metrics=dict(args.metric),
            link_to=args.link_to,
            best=best,
            reference=not args.no_reference,
        )
    print(result)
    return 0 if result.status in ("published", "skipped", "queued") else 1


def cmd_flush(args: argparse.Namespace) -> int:
    """Publish what the run directory's outbox holds pending, one line per publication (no
    W&B run is started when nothing is pending); W&B's files go under the run directory's
    ``wandb/`` unless WANDB_DIR is set."""
    from keisei_fn.publish import flush_outbox, wandb_run
    from keisei_fn.store.ledger import pending_publications

    run_dir = _existing_run_dir(args.run_dir)
    if not pending_publications(run_dir):
        print(f"{run_dir}: outbox empty, nothing to publish")
        return 0
    with wandb_run(mode=args.wandb, project=args.project, directory=run_dir) as run:
        results = flush_outbox(run_dir, run=run)
    for result in results:
        print(result)
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Top-k legal moves and the value of a position, by a checkpoint's network."""
    from keisei_fn.analysis import analyze
    from keisei_fn.store.checkpoints import load_model

    model, meta = load_model(args.checkpoint)
    sfen = None if args.sfen == "startpos" else args.sfen  # USI's name for it
    print(f"{meta.name} (step {meta.step}) on {analyze(model, sfen, top_k=args.top_k)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo (see ``keisei_fn.demo``): a fresh run, or resume an interrupted
    one; ``--steps N`` beyond a complete run's step trains on from its last checkpoint."""
    import os

    from keisei_fn.demo import DemoConfig, run_demo

    wandb_mode = args.wandb or os.environ.get("WANDB_MODE") or "offline"
    config = DemoConfig(
        run_dir=Path(args.run_dir),
        steps=args.steps,
        target_legal_mass=args.target_legal_mass,
        seed=args.seed,
        pool_size=args.pool_size,
        checkpoint_every=args.checkpoint_every,
        wandb=wandb_mode if wandb_mode in ("offline", "online", "disabled") else "offline",
    )
    print("keisei-fn demo: teaching Keisei's test network the rules of Shogi (legality objective)")
    try:
        result = run_demo(config)
    except KeyboardInterrupt:
        return 130
    how = f"resumed from {result.resumed_from}" if result.resumed_from else "fresh start"
    done = "finished" if result.trained else "complete"
    print(
        f"\n{done} at step {result.step} ({how}) in {result.seconds:.1f} s: legal mass "
        f"{result.train_legal_mass:.3f} on the training pool, "
        f"{result.heldout_legal_mass:.3f} on held-out positions"
    )
    if not result.reached_target:
        print(f"target {config.target_legal_mass} NOT reached by step {result.target_step}")
    print()
    cmd_ls(argparse.Namespace(run_dir=config.run_dir, verify=True))
    print()
    cmd_analyze(argparse.Namespace(checkpoint=config.run_dir, sfen=None, top_k=5))
    return 0 if result.reached_target else 1


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Turn a sharded (FSDP) checkpoint into a single-file one in another run directory."""
    from keisei_fn.store.convert import consolidate

    meta = consolidate(args.sharded, args.out_run_dir)
    print(f"wrote {meta.weights_path} ({human_bytes(meta.weights_size)}, step {meta.step})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """What changed between two checkpoints: spec, metadata, the top tensors by relative
    change (``--json``: everything). Exit 0 when identical, 1 when they differ (as ``diff``)."""
    from keisei_fn.diff import diff_checkpoints

    found = diff_checkpoints(args.before, args.after)
    if args.json:
        _print_json(found.to_json())
    else:
        print(found.summary(top=args.top))
    return 0 if found.identical else 1


def cmd_average(args: argparse.Namespace) -> int:
    """Average checkpoints (``--last N``: a run directory's newest) into OUT's final model,
    with the record of what went in (``info`` shows it). OUT must not exist unless
    ``--force``: then its final model, if any, is replaced."""
    from keisei_fn.average import average_checkpoints, last_checkpoints
    from keisei_fn.errors import CheckpointExistsError, SpecError
    from keisei_fn.shogi import encode_observations, random_positions
    from keisei_fn.store.checkpoints import save_final_model

    out = run_path(args.out)
    if out.exists() and not args.force:
        raise CheckpointExistsError(f"{out} exists; pass --force to write the average into it")
    if args.last is not None:
        if len(args.sources) != 1:
            raise SpecError(f"--last takes one run directory, got {len(args.sources)} sources")
        sources = last_checkpoints(_existing_run_dir(args.sources[0]), args.last)
    else:
        sources = list(args.sources)
    positions = None
    if args.recompute_bn is not None:
        if args.recompute_bn < 1:
            raise SpecError(f"--recompute-bn needs N >= 1 positions, got {args.recompute_bn}")
        boards = random_positions(args.recompute_bn, seed=args.seed, stride=3)
        positions = encode_observations(boards)
    soup = average_checkpoints(sources, args.weights, recompute_bn=positions)
    meta = save_final_model(soup, out, keep_extra=True)
    noun = "checkpoint" if len(sources) == 1 else "checkpoints"
    print(f"averaged {len(sources)} {noun} → {meta.path} (step {meta.step})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Rewrite the run directory's checkpoints of older on-disk formats in the newest one, in
    place (``--dry-run``: only say what would change). Exit 1 when a checkpoint was skipped
    (invalid, corrupt or unreadable: left as it is)."""
    from keisei_fn.store.migrate import migrate

    run_dir = _existing_run_dir(args.run_dir)
    done = migrate(run_dir, dry_run=args.dry_run)
    failed = any(m.status == "skipped" for m in done)
    if args.json:
        fields = ("name", "status", "from_version", "to_version", "detail")
        checkpoints = [{f: getattr(m, f) for f in fields} for m in done]
        _print_json({"run_dir": str(run_dir), "dry_run": args.dry_run, "checkpoints": checkpoints})
        return 1 if failed else 0
    for migration in done:
        print(migration)
    if not any(m.status in ("migrated", "would migrate") for m in done):
        print(f"{run_dir}: nothing to migrate")
    return 1 if failed else 0


def cmd_grow(args: argparse.Namespace) -> int:
    """Grow a checkpoint's tower (``keisei_fn.grow``) and save the result in another run
    directory under the same name, step and kind. A checkpoint of that name already in OUT is
    refused unless ``--force`` (then replaced); so is a spec that does not change."""
    from keisei_fn.errors import CheckpointExistsError, SpecError
    from keisei_fn.grow import grow
    from keisei_fn.store import load_state_with_meta, save_final_model, save_state
    from keisei_fn.store.locate import resolve_checkpoint
    from keisei_fn.store.names import RESUME_PREFIX, parse_stem, sidecar_path

    state, meta = load_state_with_meta(resolve_checkpoint(args.checkpoint))
    if state.spec is None:
        raise SpecError(f"{meta.path}: an arbitrary model without a ModelSpec cannot grow")
    changes = {k: getattr(args, k) for k in ("tower_depth", "tower_width")}
    new_spec = state.spec.replace(**{k: v for k, v in changes.items() if v is not None})
    if state.spec.model_type in TEST_MODEL_TYPES:
        raise SpecError(
            f"{meta.name} is a {state.spec.model_type!r} network, whose tower is fixed at depth "
            f"{state.spec.tower_depth} and width {state.spec.tower_width}: it cannot grow; grow "
            "works on 'resnet' checkpoints"
        )
    if new_spec == state.spec:
        raise SpecError(
            f"nothing to grow: {meta.name} has depth {state.spec.tower_depth} and width "
            f"{state.spec.tower_width} already; give --tower-depth or --tower-width larger than now"
        )
    grown = grow(state, new_spec, seed=args.seed)  # pure: a bad spec is refused here
    target = sidecar_path(run_path(args.out_run_dir) / meta.name)
    if target.exists() and not args.force:
        raise CheckpointExistsError(f"{target} exists; pass --force to replace it")
    if meta.kind == "final_model":
        saved = save_final_model(grown, args.out_run_dir)
    else:
        parsed = parse_stem(meta.name)
        prefix = parsed.prefix if parsed is not None and parsed.step is not None else RESUME_PREFIX
        saved = save_state(
            grown, args.out_run_dir, kind=meta.kind, prefix=prefix, overwrite=args.force
        )
    print(
        f"grew {meta.name} (depth {state.spec.tower_depth}, width {state.spec.tower_width}) → "
        f"{saved.sidecar_path} (depth {new_spec.tower_depth}, width {new_spec.tower_width})"
    )
    return 0


def cmd_compat(args: argparse.Namespace) -> int:
    """Whether a checkpoint's model would load into the network the spec options describe
    (Keisei's defaults for the options not given), from its sidecar alone: exit 0 when it
    would, 1 with the problems when not."""
    from keisei_fn.compat import check_compatible

    spec = _spec_from_args(args) or ModelSpec()
    problems = check_compatible(args.checkpoint, spec)
    if args.json:
        _print_json({"spec": spec.to_json(), "compatible": not problems, "problems": problems})
        return 1 if problems else 0
    for problem in problems:
        print(problem)
    if not problems:
        print(
            f"compatible with {spec.model_type}, depth {spec.tower_depth}, width "
            f"{spec.tower_width}, se_ratio {spec.se_ratio}"
        )
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a verified inference bundle; exit 1 (nothing written) when the behaviour gate
    fails without ``--force``."""
    from keisei_fn.errors import GateError
    from keisei_fn.serve.export import export_model

    try:
        result = export_model(
            args.source,
            args.out_dir,
            dtype=args.dtype,
            onnx=args.onnx,
            force=args.force,
            overwrite=args.overwrite,
        )
    except GateError as exc:
        print(f"keisei-fn: export refused: {exc}", file=sys.stderr)
        return 1
    bundle = result.bundle
    if args.json:
        _print_json({"dtype": bundle.dtype, "directory": str(bundle.directory), **bundle.export})
        return 0
    source_bytes = bundle.export["sizes"]["source_model_bytes"]
    onnx = f"; model.onnx {human_bytes(bundle.onnx_size)}" if bundle.onnx_file else ""
    print(
        f"wrote {bundle.directory} ({bundle.dtype}): weights {human_bytes(bundle.weights_size)}"
        f" (the float32 model: {human_bytes(source_bytes)}){onnx}"
    )
    print(f"gate: {result.comparison}")
    if result.onnx_comparison is not None:
        print(f"onnx: {result.onnx_comparison}")
    for problem in result.problems:
        print(f"FORCED despite: {problem}")
    return 0


def cmd_usi(args: argparse.Namespace) -> int:
    """A USI engine on stdin/stdout (see ``keisei_fn.usi``). A source that names no checkpoint
    is a user error at once (the engine itself loads the model only at ``isready``)."""
    import torch

    from keisei_fn.errors import SpecError
    from keisei_fn.store.locate import resolve_checkpoint
    from keisei_fn.usi import run_engine

    if args.threads < 1:
        raise SpecError(f"--threads must be at least 1, got {args.threads}")
    resolve_checkpoint(args.source)  # sidecars only: the engine still starts at once
    torch.set_num_threads(args.threads)
    return run_engine(args.source, sys.stdin, sys.stdout, device=args.device)


def cmd_match(args: argparse.Namespace) -> int:
    """Play a match between two players; print W/L/D and the Elo difference."""
    import shlex

    from keisei_fn.errors import SpecError
    from keisei_fn.match import UsiCommand, play_match

    given = list(args.players)
    players: list[Any] = []
    for command in (args.engine_a, args.engine_b):
        if command is not None:
            players.append(UsiCommand(tuple(shlex.split(command))))
        elif given:
            players.append(given.pop(0))
    if len(players) != 2 or given:
        raise SpecError("match needs two players: A B, or --engine-a/--engine-b for either")
    result = play_match(
        players[0],
        players[1],
        games=args.games,
        playouts=(args.playouts, args.playouts if args.playouts_b is None else args.playouts_b),
        seed=args.seed,
        move_cap=args.move_cap,
        out=args.out,
        progress=print,
    )
    print(result.summary())
    print(f"records and summary.json in {result.out}")
    return 0
