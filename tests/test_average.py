"""average_states (model soups), recompute_bn and ``keisei-fn average``.

Tensors are compared bit-exactly (dtype, shape, raw bytes): the average is defined (a float64
sum in a canonical order) so that its properties hold exactly, not within a tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_inprocess import run as cli
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_states import raw_bytes

import keisei_fn as kf
from keisei_fn.average import (
    AVERAGE_KEY,
    average_summary,
    last_checkpoints,
    normalized_weights,
)
from keisei_fn.errors import CheckpointNotFoundError, SpecError, StateMismatchError
from keisei_fn.shogi import encode_observations, random_positions
from keisei_fn.testing import assert_states_equal, train_states

SPEC = kf.ModelSpec(model_type="testmodel", num_actions=32)
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def weights_only(state: kf.TrainState) -> kf.TrainState:
    return state.replace(optimizer=None, scheduler=None, scaler=None, rng=None, extra={})


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        (a[k].dtype, a[k].shape, raw_bytes(a[k])) == (b[k].dtype, b[k].shape, raw_bytes(b[k]))
        for k in a
    )


def net_state(seed: int, step: int) -> kf.TrainState:
    model = kf.build_model(SPEC, seed=seed)
    with torch.no_grad():  # distinct running statistics too
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(generator=torch.Generator().manual_seed(seed))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(step)
    return kf.capture(SPEC, model, torch.optim.SGD(model.parameters(), lr=0.1), step=step)


@settings(max_examples=30, deadline=None)
@given(train_states())
def test_averaging_one_state_is_the_identity(state: kf.TrainState) -> None:
    soup = kf.average_states([state])
    assert_states_equal(soup.replace(extra={}), weights_only(state))
    assert kf.thaw(soup.extra[AVERAGE_KEY]["inputs"]) == [{"step": state.step, "weight": 1.0}]


@st.composite
def layouts(
    draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = FLOATS
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    keys = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    return {k: (draw(shapes), draw(st.sampled_from(dtypes))) for k in keys}


def random_state(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int, step: int):
    gen = torch.Generator().manual_seed(seed)
    model = {}
    for key, (shape, dtype) in layout.items():
        values = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** (seed % 7 - 3)
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40])
        pick = torch.randint(0, 8 * len(specials), shape, generator=gen)
        values = torch.where(pick < len(specials), specials[pick % len(specials)].double(), values)
        model[key] = values.to(dtype)
    return kf.TrainState(spec=None, step=step, model=model)


@settings(max_examples=40, deadline=None)
@given(
    layout=layouts(),
    seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=5),
    data=st.data(),
)
def test_averaging_is_permutation_invariant(layout, seeds, data) -> None:
    states = [random_state(layout, seed, step=i + 1) for i, seed in enumerate(seeds)]
    weights = data.draw(
        st.lists(st.floats(0, 100), min_size=len(states), max_size=len(states)).filter(
            lambda ws: sum(ws) > 0
        )
        | st.none(),
        label="weights",
    )
    order = data.draw(st.permutations(range(len(states))), label="order")
    soup = kf.average_states(states, weights, names=[f"s{i}" for i in range(len(states))])
    shuffled = kf.average_states(
        [states[i] for i in order],
        None if weights is None else [weights[i] for i in order],
        names=[f"s{i}" for i in order],
    )
    assert_states_equal(soup, shuffled)


@settings(max_examples=20, deadline=None)
@given(
    layout=layouts(FLOATS[:1] + FLOATS[2:]),
    seed=st.integers(0, 2**16),
    copies=st.sampled_from([2, 4, 8]),
)
def test_averaging_copies_gives_the_state_back(layout, seed, copies) -> None:
    # weights 1/2^k: every product and partial sum of a float32 (or narrower) value is exact
    # in float64, so the mean of copies is the value itself
    state = random_state(layout, seed, step=3)
    soup = kf.average_states([state] * copies)
    assert same_tensors(dict(soup.model), dict(state.model))


def test_weighted_average_values_and_record() -> None:
    a = kf.TrainState(spec=None, step=5, model={"w": torch.tensor([0.0, 4.0, -2.0])})
    b = kf.TrainState(spec=None, step=9, episodes=7, model={"w": torch.tensor([4.0, 8.0, 2.0])})
    soup = kf.average_states([b, a], weights=[1, 3], names=["b", "a"])
    assert same_tensors(dict(soup.model), {"w": torch.tensor([1.0, 5.0, -1.0])})
    assert (soup.step, soup.episodes) == (9, 7)
    assert soup.optimizer is None and soup.rng is None
    assert kf.thaw(soup.extra[AVERAGE_KEY]) == {
        "inputs": [
            {"step": 5, "weight": 0.75, "source": "a"},
            {"step": 9, "weight": 0.25, "source": "b"},
        ],
        "bn": "averaged",
    }
    assert average_summary(soup.extra) == (
        "average of 2: a (w 0.75), b (w 0.25); BatchNorm statistics averaged"
    )


def test_batchnorm_counts_take_the_max_and_running_stats_are_averaged() -> None:
    states = [net_state(seed, step) for seed, step in ((1, 300), (2, 100), (3, 200))]
    soup = kf.average_states(states)
    key = "bn_stem.num_batches_tracked"
    assert soup.model[key].dtype == torch.int64 and int(soup.model[key]) == 300
    means = [s.model["bn_stem.running_mean"].double() for s in states]
    # three float32 inputs: their exact sum needs at most 27 bits, so (a+b+c)/3 rounds once
    expected = ((means[0] + means[1] + means[2]) / 3).float()
    assert raw_bytes(soup.model["bn_stem.running_mean"]) == raw_bytes(expected)
    kf.restore_(soup, kf.build_model(SPEC), rng=False)  # a loadable model


def test_tied_tensors_stay_tied() -> None:
    states = []
    for seed in range(3):
        w = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
        states.append(kf.TrainState(spec=None, step=seed + 1, model={"w": w, "tied": w}))
    soup = kf.average_states(states)
    assert soup.model["w"] is soup.model["tied"]


def test_incompatible_states_name_the_first_differences() -> None:
    a = kf.TrainState(spec=None, step=1, model={"w": torch.zeros(2), "b": torch.zeros(1)})
    cases = {
        "1 tensor in state 0 is not in state 1: 'b'": {"w": torch.zeros(2)},
        "1 tensor in state 1 is not in state 0: 'x'": {
            "w": torch.zeros(2),
            "b": torch.zeros(1),
            "x": torch.zeros(1),
        },
        "1 tensor has another shape: 'w' (state 1 has float32[3], state 0 float32[2])": {
            "w": torch.zeros(3),
            "b": torch.zeros(1),
        },
        "1 tensor has another dtype: 'b' (state 1 has float64[1], state 0 float32[1])": {
            "w": torch.zeros(2),
            "b": torch.zeros(1, dtype=torch.float64),
        },
    }
    for message, model in cases.items():
        with pytest.raises(StateMismatchError) as failure:
            kf.average_states([a, kf.TrainState(spec=None, step=2, model=model)])
        assert str(failure.value) == f"cannot average incompatible states:\n  - {message}"
    with pytest.raises(StateMismatchError, match="state 1 has spec ModelSpec"):
        kf.average_states([a, a.replace(spec=SPEC)])
    with pytest.raises(StateMismatchError) as failure:
        kf.average_states([a.replace(spec=SPEC), a.replace(spec=SPEC.replace(num_actions=9))])
    assert str(failure.value) == (
        "cannot average incompatible states:\n"
        f"  - spec differs (state 1 vs state 0): num_actions 9 vs {SPEC.num_actions}"
    )
    ints = [kf.TrainState(spec=None, step=1, model={"table": torch.tensor([v, 2])}) for v in (1, 3)]
    with pytest.raises(StateMismatchError, match="cannot average 'table'"):
        kf.average_states(ints)
    assert int(kf.average_states([ints[0], ints[0]]).model["table"][0]) == 1


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "1 weights for 2 inputs"), ([1, -1], ">= 0"), ([0, 0], "positive sum"),
     ([1, float("nan")], ">= 0"), ([10**400, 1], ">= 0")],
)  # fmt: skip
def test_bad_weights_are_refused(weights: list[float], message: str) -> None:
    a = kf.TrainState(spec=None, step=1, model={"w": torch.zeros(2)})
    with pytest.raises(SpecError, match=message):
        kf.average_states([a, a], weights)
    with pytest.raises(SpecError, match="no inputs"):
        kf.average_states([])


def test_huge_weights_keep_their_ratios() -> None:
    # their sum is beyond a float's range: the weights are scaled down, not overflowed
    assert normalized_weights([1e308, 1e308], 2) == (0.5, 0.5)
    assert normalized_weights([1.5e308, 1.5e308, 1.5e308, 1.5e308], 4) == (0.25,) * 4


def test_recompute_bn_replaces_only_the_running_stats() -> None:
    rng = torch.get_rng_state()
    boards = random_positions(6, seed=3, stride=3)
    sfens = [b.sfen() for b in boards]
    a, b = net_state(1, 10), net_state(1, 20)  # same weights; b's stats differ only in count
    b = b.replace(model={**b.model, "bn_stem.running_mean": torch.zeros(16)})
    by_sfen = kf.average_states([a], recompute_bn=sfens)
    by_planes = kf.recompute_bn(a, encode_observations(boards), batch_size=4)
    from_b = kf.recompute_bn(b, encode_observations(boards), batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert kf.thaw(by_sfen.extra[AVERAGE_KEY]["bn"]) == {"recomputed": 6}
    for key, tensor in a.model.items():
        stat = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        assert (raw_bytes(by_sfen.model[key]) == raw_bytes(tensor)) != stat, key
    assert int(by_sfen.model["bn_stem.num_batches_tracked"]) == 1  # one batch of 6
    assert int(by_planes.model["bn_stem.num_batches_tracked"]) == 2  # batches of 4 and 2
    # the old statistics play no part
    assert same_tensors(dict(by_planes.model), dict(from_b.model))


def test_recompute_bn_refusals() -> None:
    state = net_state(0, 1)
    with pytest.raises(SpecError, match="shape"):
        kf.recompute_bn(state, torch.zeros(2, 45, 9, 9))
    with pytest.raises(SpecError, match="sequence of SFENs"):
        kf.recompute_bn(state, "lnsgkgsnl/1r5b1/ppppppppp/9/9/9/PPPPPPPPP/1B5R1/LNSGKGSNL b - 1")
    with pytest.raises(SpecError, match="needs a state with a ModelSpec"):
        kf.recompute_bn(state.replace(spec=None), torch.zeros(2, 46, 9, 9))


# -- keisei-fn average --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("soup") / "run"
    for i, seed in enumerate((5, 6, 7, 8)):
        kf.save_state(net_state(seed, 100 * (i + 1)), path)
    return path


def test_cli_average_last_n(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soup"
    done = cli("average", str(run_dir), "--last", "3", str(out))
    assert done.returncode == 0, done.stderr
    assert "averaged 3 checkpoints" in done.stdout
    model, meta = kf.load_model(out)
    sources = [run_dir / f"checkpoint_ts{s}" for s in (200, 300, 400)]
    expected = kf.average_states(
        [kf.load_state(s) for s in sources], names=[str(s) for s in sources]
    )
    assert (meta.kind, meta.step) == ("final_model", 400)
    assert same_tensors(kf.canonical_state_dict(model.state_dict()), dict(expected.model))
    assert kf.thaw(meta.extra[AVERAGE_KEY]) == kf.thaw(expected.extra[AVERAGE_KEY])
    info = cli("info", str(out))
    assert "made as        average of 3: " in info.stdout
    assert f"{run_dir}/checkpoint_ts200 (w 0.3333)" in info.stdout
    assert json.loads(cli("info", str(out), "--json").stdout)["average"]["bn"] == "averaged"
    # OUT exists now: refused without --force, and nothing is written
    again = cli("average", str(run_dir), "--last", "2", str(out))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert kf.load_model(out)[1].digest == meta.digest


def test_cli_average_paths_weights_and_recompute_bn(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soup"
    out.mkdir()
    first = str(run_dir / "checkpoint_ts100")
    done = cli(
        "average", first, str(run_dir), str(out), "--weights", "1,3", "--recompute-bn", "5",
        "--force",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = kf.load_state(out / "final_model")
    positions = encode_observations(random_positions(5, seed=0, stride=3))
    expected = kf.average_states(
        [kf.load_state(first), kf.load_state(run_dir)], [1, 3], recompute_bn=positions
    )
    assert same_tensors(dict(state.model), dict(expected.model))
    assert [i["weight"] for i in state.extra[AVERAGE_KEY]["inputs"]] == [0.25, 0.75]
    assert kf.thaw(state.extra[AVERAGE_KEY]["bn"]) == {"recomputed": 5}


def test_cli_average_refusals(run_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "soup")
    cases = [
        (("average", str(run_dir), "--last", "9", out), "fewer than 9"),
        (("average", str(run_dir), str(run_dir), "--last", "2", out), "one run directory"),
        (("average", str(run_dir), "--last", "2", "--weights", "1,2,3", out), "3 weights for 2"),
        (("average", str(tmp_path / "nowhere"), "--last", "2", out), "no run directory"),
    ]
    for argv, message in cases:
        done = cli(*argv)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
    assert not Path(out).exists()
    assert cli("average", str(run_dir), "--weights", "1,x", out).returncode == 2


def test_cli_average_of_incompatible_checkpoints_is_a_one_line_error(tmp_path: Path) -> None:
    """The error lists its problems on lines of their own; the CLI prints one line."""
    sources = []
    for actions in (8, 9):
        spec = kf.ModelSpec(model_type="testmodel", num_actions=actions)
        state = kf.capture(spec, kf.build_model(spec), step=1)
        sources.append(str(kf.save_state(state, tmp_path / str(actions)).path))
    with pytest.raises(StateMismatchError) as failure:
        kf.average_checkpoints(sources)
    problems = str(failure.value).splitlines()
    assert problems == [
        "cannot average incompatible states:",
        "  - spec differs (state 1 vs state 0): num_actions 9 vs 8",
        "  - 2 tensors have other shapes: 'policy_head.4.weight' (state 1 has float32[9, 162], "
        "state 0 float32[8, 162]), 'policy_head.4.bias' (state 1 has float32[9], state 0 "
        "float32[8])",
    ]
    done = cli("average", *sources, str(tmp_path / "soup"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "keisei-fn: error: cannot average incompatible states: spec differs (state 1 vs state 0): "
        "num_actions 9 vs 8 (+1 more line in the Python API's error)\n"
    )
    assert not (tmp_path / "soup").exists()


def test_last_checkpoints_are_the_newest_resume_points(run_dir: Path) -> None:
    assert [Path(p).name for p in last_checkpoints(run_dir, 2)] == [
        "checkpoint_ts300",
        "checkpoint_ts400",
    ]
    with pytest.raises(SpecError, match=">= 1"):
        last_checkpoints(run_dir, 0)
    with pytest.raises(CheckpointNotFoundError, match="no run directory"):
        last_checkpoints(run_dir / "missing", 1)  # not "0 usable checkpoints"


def test_info_on_a_users_own_average_key_shows_no_average(tmp_path: Path) -> None:
    # ``extra`` is the user's: an "average" entry average_states did not write is not a soup
    spec = kf.ModelSpec(model_type="testmodel", num_actions=8)
    model = kf.build_model(spec, seed=0)
    for step, record in enumerate(
        [{"inputs": [{"step": 1, "weight": "heavy"}]}, {"inputs": "abc"}, {"inputs": []}], 1
    ):
        meta = kf.save_state(
            kf.capture(spec, model, step=step, extra={"average": record}), tmp_path
        )
        assert average_summary(meta.extra) is None
        done = cli("info", str(meta.path))
        assert done.returncode == 0 and "made as" not in done.stdout, done.stderr
        assert json.loads(cli("info", str(meta.path), "--json").stdout)["average"] is None
    state = kf.capture(spec, model, step=1, extra={"average": 0.5})
    recomputed = kf.recompute_bn(state, torch.ones(2, *spec.obs_shape))
    assert recomputed.extra == {"average": 0.5}  # left as it is
