"""A new user's first hour (issue #17): what they meet first says what is true.

- Files are judged by their content, never by their suffix: random bytes named ``.pth`` are
  "not a recognisable checkpoint", a ``torch.save`` file under any name is one (convert it), and
  our own checkpoint handed to ``convert`` needs no conversion.
- ``print(meta)``, ``print(state)``, ``print(analyze(model))`` and ``print(list_checkpoints(..))``
  show tables (the CLI's rendering), Jupyter gets HTML tables, and ``list_checkpoints(..).plot()``
  draws the checkpoints' metrics over steps.
- Periodic W&B artifacts carry Keisei's top-level ``global_timestep``,
  ``total_episodes_completed``, ``elo_state`` and ``metrics_history`` (read back from offline
  run files, as in ``test_publish``).
- The docs describe the ``or`` override bug as older Keisei versions' (fixed in February 2026).
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import safetensors.torch
import test_publish
import torch

import keisei_fn.spec as spec_module
from keisei_fn import (
    CheckpointList,
    ModelSpec,
    build_model,
    capture,
    import_legacy,
    list_checkpoints,
    load_model,
    load_state,
    save_final_model,
    save_state,
)
from keisei_fn.cli import main
from keisei_fn.errors import (
    AlreadyConvertedError,
    IncompleteCheckpointError,
    IntegrityError,
    MissingExtraError,
    SpecError,
    UnsupportedFormatError,
)
from keisei_fn.meta import CheckpointMeta
from keisei_fn.publish import artifact_metadata, flush_outbox, publish
from keisei_fn.publish.plan import PERIODIC_KEYS
from keisei_fn.store import pending_publications, verify_checkpoint
from keisei_fn.store.sniff import HEAD_BYTES, identify_bytes, identify_file

#: test_publish's fixtures: a real offline W&B run, whose records are read back from its file.
wandb_dir = test_publish.wandb_dir
offline = test_publish.offline
tiny_checkpoint = test_publish.tiny_checkpoint

TORCH_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
SPEC = ModelSpec(model_type="testmodel")


def our_checkpoint(run_dir: Path, step: int = 10) -> CheckpointMeta:
    return save_state(capture(SPEC, build_model(SPEC, seed=0), step=step), run_dir)


def random_bytes(size: int = 4096) -> bytes:
    data = random.Random(17).randbytes(size)
    assert identify_bytes(data).kind == "unknown"
    return data


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- item 6: files are judged by their content -------------------------------------------


@pytest.mark.parametrize("suffix", TORCH_SUFFIXES)
def test_random_bytes_are_not_called_a_pickled_checkpoint(tmp_path, capsys, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(random_bytes())
    for load in (load_state, verify_checkpoint):
        with pytest.raises(UnsupportedFormatError, match="not a recognisable checkpoint") as info:
            load(path)
        message = str(info.value)
        assert "first bytes" in message and "pickle" not in message
        assert "could run code" not in message and "torch.save" not in message
    for command in ("info", "verify"):
        code, output = cli(capsys, command, path)
        assert code == 2
        assert "not a recognisable checkpoint (first bytes" in output
        assert "pickle" not in output


@pytest.mark.parametrize("suffix", [*TORCH_SUFFIXES, ".safetensors", ""])
def test_a_torch_save_file_under_any_name_is_named_and_sent_to_convert(tmp_path, capsys, suffix):
    path = tmp_path / f"checkpoint_ts5{suffix}"
    torch.save({"model_state_dict": build_model(SPEC, seed=0).state_dict()}, path)
    with pytest.raises(UnsupportedFormatError, match=r"a torch\.save zip archive") as info:
        load_state(path)
    assert "import_legacy" in str(info.value) and "keisei-fn convert" in str(info.value)
    code, output = cli(capsys, "info", path)
    assert code == 2 and "torch.save zip archive" in output and "convert" in output


def test_the_pre_1_6_torch_format_is_named_too(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedFormatError, match=r"pre-1\.6 .* pickle format.*import_legacy"):
        load_state(path)


@pytest.mark.parametrize("which", ["weights", "sidecar"])
def test_convert_on_our_own_checkpoint_says_it_needs_no_conversion(tmp_path, capsys, which):
    meta = our_checkpoint(tmp_path / "run")
    path = meta.weights_path if which == "weights" else meta.sidecar_path
    with pytest.raises(AlreadyConvertedError, match="needs no conversion") as info:
        import_legacy(path, tmp_path / "imported")
    assert "load_state" in str(info.value) and "torch.save" not in str(info.value)
    assert isinstance(info.value, UnsupportedFormatError)
    code, output = cli(capsys, "convert", path, tmp_path / "imported")
    assert code == 2 and "needs no conversion" in output and "load it directly" in output.lower()
    assert not (tmp_path / "imported").exists()
    assert load_state(path).step == 10  # and it loads directly, as the message says


def test_convert_names_what_a_foreign_file_is(tmp_path):
    foreign = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(UnsupportedFormatError, match="is a safetensors file") as info:
        import_legacy(foreign, tmp_path / "run")
    assert not isinstance(info.value, AlreadyConvertedError)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(random_bytes())
    with pytest.raises(IntegrityError, match="not a recognisable checkpoint"):
        import_legacy(garbage, tmp_path / "run")


def test_load_names_foreign_and_misnamed_files(tmp_path):
    foreign = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(UnsupportedFormatError, match="is a safetensors file;"):
        load_state(foreign)
    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        load_state(empty)
    meta = our_checkpoint(tmp_path / "run")
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(meta.weights_path.read_bytes())
    with pytest.raises(IncompleteCheckpointError, match=r"keisei_fn weights file.*no sidecar"):
        load_state(renamed)
    sidecar = tmp_path / "sidecar.bin"
    sidecar.write_bytes(meta.sidecar_path.read_bytes())
    with pytest.raises(UnsupportedFormatError, match=r"sidecar.*checkpoint_ts10\.json"):
        load_state(sidecar)


def test_identify_file_reads_only_the_first_bytes(tmp_path, monkeypatch):
    import keisei_fn.store.sniff as sniff

    path = tmp_path / "big.bin"
    path.write_bytes(random_bytes(3 * HEAD_BYTES))
    asked = []
    real = sniff.read_head
    monkeypatch.setattr(
        sniff, "read_head", lambda p, *, limit: asked.append(limit) or real(p, limit=limit)
    )
    assert identify_file(path).kind == "unknown"
    assert asked == [HEAD_BYTES]
    assert real(path, limit=HEAD_BYTES) == path.read_bytes()[:HEAD_BYTES]


# --- item 15: docs say what Keisei does now ----------------------------------------------

#: "Keisei resolved overrides with `or`" / "Keisei bug: `args.se_ratio or ...`": Keisei fixed
#: that in February 2026; only older Keisei versions did it.
STALE_OR_CLAIM = re.compile(r"(?<!older )Keisei(?: bug:)? (?:resolved|resolves|`args\.\w+ or)")


def test_docs_describe_the_or_overrides_as_older_keiseis():
    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", *root.glob("keisei_fn/**/*.py"), *root.glob("tests/*.py")]
    stale = [
        f"{path.relative_to(root)}: {match[0]!r}"
        for path in files
        if path.name != Path(__file__).name
        for match in STALE_OR_CLAIM.finditer(" ".join(path.read_text().split()))
    ]
    assert not stale, "Keisei resolves overrides with `is not None` since February 2026"
    assert "older Keisei versions resolved overrides with ``or``" in " ".join(
        (spec_module.__doc__ or "").split()
    )


# --- item 14: Keisei's periodic-artifact metadata keys -----------------------------------------


def test_periodic_artifacts_carry_keiseis_trainer_stats_at_the_top(tmp_path, offline):
    elo = {"black_rating": 1516.0, "white_rating": 1484.0, "rating_history": [1500.0, 1516.0]}
    history = {"policy_losses": [0.5, float("nan")], "learning_rates": [3e-4, 3e-4]}
    run_dir = tmp_path / "run"
    periodic = tiny_checkpoint(run_dir, 10240, elo_state=elo, metrics_history=history)
    bare = tiny_checkpoint(run_dir, 20480)
    initial = save_state(
        capture(None, torch.nn.Linear(2, 2), step=64, episodes=3, extra={"elo_state": elo}),
        run_dir,
        prefix="initial_eval_checkpoint_ts",
    )
    final = save_state(capture(None, torch.nn.Linear(2, 2), step=30720), run_dir, kind="final")
    for meta in (periodic, bare, initial, final):
        assert publish(meta, run_name="keisei", run=offline.run).status == "published"

    logged = {a["name"]: a["metadata"] for a in offline.artifacts()}
    md = logged["keisei-checkpoint-ts10240"]
    assert (md["global_timestep"], md["total_episodes_completed"]) == (10240, 102)
    assert md["elo_state"] == elo
    assert md["metrics_history"] == {"policy_losses": [0.5, "nan"], "learning_rates": [3e-4] * 2}
    assert (
        md["extra"]["elo_state"] == elo and md["extra"]["metrics_history"] == md["metrics_history"]
    )
    assert md["training_timesteps"] == 10240 and md["total_episodes"] == 102  # as before

    md = logged["keisei-checkpoint-ts20480"]
    assert (md["global_timestep"], md["total_episodes_completed"]) == (20480, 204)
    assert "elo_state" not in md and "metrics_history" not in md
    md = logged["keisei-initial-eval-checkpoint-ts64"]
    assert (md["global_timestep"], md["total_episodes_completed"], md["elo_state"]) == (64, 3, elo)
    md = logged["keisei-final-checkpoint"]  # Keisei's final artifacts had only the game counts
    assert not set(PERIODIC_KEYS) & set(md)
    assert md["training_timesteps"] == 30720


def test_a_queued_publication_of_a_keisei_sized_history_flushes_with_its_metadata(
    tmp_path, offline
):
    """Keisei keeps 1000 values per metric; the ledger's pending record must stay readable (it
    refuses to parse a line with more than a few hundred values), so it records only the
    caller's metadata and the rest is rebuilt from the checkpoint when flushed."""
    history = {name: [0.25] * 1000 for name in ("policy_losses", "value_losses", "entropies")}
    meta = tiny_checkpoint(tmp_path / "run", 10240, metrics_history=history)
    down = test_publish.FlakyRun(offline.run, [TimeoutError("down")] * 3)

    queued = publish(meta, run_name="keisei", run=down, backoff=0, metadata={"note": "mine"})

    assert queued.status == "queued"
    assert list(pending_publications(meta.run_dir)), "the pending record was unreadable"
    (flushed,) = flush_outbox(meta.run_dir, run=offline.run, backoff=0)
    assert flushed.status == "published"
    (logged,) = offline.artifacts()
    md = logged["metadata"]
    assert md == artifact_metadata(meta, {"note": "mine"})
    assert md["global_timestep"] == 10240 and md["metrics_history"] == history
    assert md["note"] == "mine"


# --- item 9: notebooks print tables, not dataclass reprs ---------------------------------------


def test_print_analysis_shows_the_clis_table(tmp_path, capsys):
    from keisei_fn.analysis import Analysis, MoveScore, analyze

    meta = our_checkpoint(tmp_path / "run")
    model, _ = load_model(meta.path)
    result = analyze(model, top_k=3)
    text = str(result)
    assert "Analysis(" not in text and "MoveScore(" not in text
    assert text.splitlines()[0] == result.sfen
    assert "#  move" in text and all(m.usi in text for m in result.moves)
    assert repr(result).startswith("Analysis(sfen=")  # repr unchanged, for debugging
    code, output = cli(capsys, "analyze", meta.path, "--top-k", "3")
    assert code == 0 and text.split("\n", 1)[1] in output  # the same lines as the CLI's

    html = result._repr_html_()
    assert html.startswith("<table>") and "<th>move</th>" in html
    assert all(f"<td>{m.usi}</td>" in html for m in result.moves)
    hostile = Analysis(
        sfen="<b>&", side="black", value=0.0, legal_mass=1.0,
        moves=(MoveScore(usi="<i>", index=0, probability=1.0),),
    )  # fmt: skip
    html = hostile._repr_html_()
    assert "&lt;b&gt;&amp;" in html and "&lt;i&gt;" in html and "<b>" not in html


def test_print_meta_and_state_show_field_tables(tmp_path):
    model = build_model(SPEC, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    extra = {"loss": 0.123456, "note": "<script>", "history": [1.0, 2.0]}
    state = capture(SPEC, model, optimizer, step=10, episodes=4, extra=extra)
    meta = save_state(state, tmp_path / "run")

    text = str(meta)
    assert "CheckpointMeta(" not in text and repr(meta).startswith("CheckpointMeta(")
    assert text.splitlines()[0] == "checkpoint_ts10"
    assert text.splitlines()[1].split() == ["field", "value"]
    for field, value in [
        ("kind", "periodic"), ("step", "10"), ("episodes", "4"), ("extra.loss", "0.1235"),
        ("extra.history", "list of 2"), ("extra.note", "<script>"),
        ("games", "0 black wins, 0 white wins, 0 draws"),
    ]:  # fmt: skip
        assert any(line.split(None, 1) == [field, value] for line in text.splitlines()), field
    assert "testmodel  depth 1  width 16" in text
    html = meta._repr_html_()
    assert html.startswith("<table><caption>checkpoint_ts10</caption>")
    assert "<td>&lt;script&gt;</td>" in html and "<script>" not in html

    loaded = load_state(meta.path)
    text = str(loaded)
    assert "TrainState(" not in text and text.splitlines()[0] == "TrainState at step 10"
    assert "parameter states" in text and "(lr 0.0003)" in text and "extra.loss" in text
    html = loaded._repr_html_()
    assert html.startswith("<table>") and "&lt;script&gt;" in html and "<script>" not in html


def run_with_metrics(run_dir: Path) -> list[tuple[int, float, float]]:
    """Three checkpoints recording the demo's legal mass and a loss; the final model none."""
    model = build_model(SPEC, seed=0)
    points = [(100, 0.9, 0.05), (200, 0.5, 0.3), (300, 0.25, 0.6)]
    for step, loss, mass in points:
        extra = {"loss": loss, "train_legal_mass": mass, "completed": False}
        save_state(capture(SPEC, model, step=step, extra=extra), run_dir)
    save_final_model(capture(SPEC, model, step=300), run_dir)
    return points


def test_list_checkpoints_prints_a_table_and_stays_a_list(tmp_path):
    run_dir = tmp_path / "run"
    assert list_checkpoints(run_dir) == [] and str(list_checkpoints(run_dir)) == "no checkpoints"
    run_with_metrics(run_dir)

    listed = list_checkpoints(run_dir)
    assert isinstance(listed, CheckpointList) and isinstance(listed, list)
    assert [m.step for m in listed] == [100, 200, 300, 300]
    lines = str(listed).splitlines()
    assert lines[0].split() == ["name", "step", "kind", "size", "age", "loss", "train_legal_mass"]
    assert lines[1].split()[:3] == ["checkpoint_ts100", "100", "periodic"]
    assert lines[1].split()[-2:] == ["0.9", "0.05"] and lines[4].split()[-2:] == ["-", "-"]
    html = listed._repr_html_()
    assert html.startswith("<table>") and "<th>train_legal_mass</th>" in html
    assert "<td>checkpoint_ts300</td>" in html


def test_plot_draws_one_line_per_metric_over_steps(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = run_with_metrics(tmp_path / "run")
    listed = list_checkpoints(tmp_path / "run")

    ax = listed.plot(("loss", "train_legal_mass"))
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["loss", "train_legal_mass"]
    for line, column in zip(lines, (1, 2), strict=True):
        assert list(line.get_xdata()) == [p[0] for p in points]
        assert list(line.get_ydata()) == [p[column] for p in points]
    assert ax.get_xlabel() == "step"
    plt.close(ax.figure)

    _, own = plt.subplots()
    assert listed.plot(ax=own) is own and len(own.get_lines()) == 2  # every metric by default
    plt.close(own.figure)
    with pytest.raises(SpecError, match=r"extra\['lr'\].*loss"):
        listed.plot(["lr"])

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # not installed
    with pytest.raises(MissingExtraError, match=r"keisei-fn\[notebook\]"):
        listed.plot()


def test_the_cli_and_the_reprs_render_with_the_same_functions():
    import keisei_fn.cli.table as cli_table
    import keisei_fn.display as display

    for name in ("render_table", "human_bytes", "human_age"):
        assert getattr(cli_table, name) is getattr(display, name)
