"""Capture and restore random-number-generator states (the RNG part of a TrainState).

Global generators are always covered: Python's ``random``, NumPy's global (legacy) generator,
torch's CPU generator and, when CUDA is available, every CUDA device's generator. Generators the
user holds are covered only when passed by name, e.g. ``generators={"env": numpy_generator}``;
supported are ``torch.Generator``, ``numpy.random.Generator`` and ``random.Random``.

Example:
    >>> import random
    >>> state = capture_rng()
    >>> a = random.random()
    >>> restore_rng_(state)
    >>> random.random() == a
    True
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from keisei_fn.errors import StateMismatchError
from keisei_fn.state import thaw

__all__ = ["Generators", "capture_rng", "numpy_legacy_state", "restore_rng_", "rng_problems"]

log = logging.getLogger(__name__)

Generators = Mapping[str, torch.Generator | np.random.Generator | random.Random]


def _generator_state(name: str, gen: Any) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"type": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        return {"type": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, random.Random):
        return {"type": "python", "state": gen.getstate()}
    raise StateMismatchError(
        f"generator {name!r} is a {type(gen).__name__}; supported are torch.Generator, "
        "numpy.random.Generator and random.Random"
    )


def numpy_legacy_state(source: np.random.RandomState | None = None) -> dict[str, Any]:
    """The MT19937 state of NumPy's global generator (or of ``source``) as the RNG part stores
    it: the 624-word key as a uint32 tensor, the rest as plain numbers.

    Example:
        >>> numpy_legacy_state(np.random.RandomState(0))["key"].shape
        torch.Size([624])
    """
    generator = source if source is not None else np.random
    raw = generator.get_state(legacy=False)
    return {
        "bit_generator": raw["bit_generator"],
        "key": torch.from_numpy(raw["state"]["key"].copy()),
        "pos": int(raw["state"]["pos"]),
        "has_gauss": int(raw["has_gauss"]),
        "gauss": float(raw["gauss"]),
    }


def capture_rng(generators: Generators | None = None) -> dict[str, Any]:
    """Snapshot the global RNGs and the named user generators.

    Args:
        generators: user-held generators to include, by name.

    Returns:
        A nested dict of plain values and CPU tensors (fresh copies).

    Raises:
        StateMismatchError: for an unsupported generator type.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_legacy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {
            name: _generator_state(name, gen) for name, gen in (generators or {}).items()
        },
    }
    return state


def rng_problems(state: Mapping[str, Any], generators: Generators | None = None) -> list[str]:
    """Why a captured RNG state cannot be restored into ``generators``: a name it does not hold,
    a different generator type or NumPy bit generator. Empty when it can.

    Raises:
        StateMismatchError: for an unsupported generator type.

    Example:
        >>> rng_problems(capture_rng(), {"env": random.Random()})
        ["generator 'env' is not in the saved state ([])"]
    """
    saved = state.get("generators", {})
    problems = []
    for name, gen in (generators or {}).items():
        live = _generator_state(name, gen)
        if name not in saved:
            problems.append(f"generator {name!r} is not in the saved state ({sorted(saved)})")
        elif live["type"] != saved[name]["type"]:
            problems.append(
                f"generator {name!r}: saved type {saved[name]['type']!r}, live {live['type']!r}"
            )
        elif live["type"] == "numpy":
            kind, saved_kind = live["state"]["bit_generator"], saved[name]["state"]["bit_generator"]
            if kind != saved_kind:
                problems.append(
                    f"generator {name!r}: saved {saved_kind} state, live generator uses {kind}"
                )
    return problems


def restore_rng_(state: Mapping[str, Any], generators: Generators | None = None) -> None:
    """Set the global RNGs (and the named user generators) to a captured state, in place.

    CUDA states are restored when CUDA is available here; otherwise (a GPU run resumed on a CPU)
    they are skipped with a warning. A named generator missing from ``state`` is an error.

    Raises:
        StateMismatchError: when ``generators`` names one the state does not hold, or a type
            differs (see :func:`rng_problems`); nothing is changed then.
    """
    problems = rng_problems(state, generators)
    if problems:
        raise StateMismatchError("cannot restore RNG state: " + "; ".join(problems))
    state = thaw(state)
    saved = state.get("generators", {})
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].clone())
    cuda_states = state.get("cuda", [])
    if cuda_states:
        if not torch.cuda.is_available():
            log.warning("checkpoint holds CUDA RNG states but CUDA is unavailable: not restored")
        elif len(cuda_states) != torch.cuda.device_count():
            log.warning(
                "checkpoint holds %d CUDA RNG states, this host has %d devices: not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all([s.clone() for s in cuda_states])
    for name, gen in (generators or {}).items():
        saved_state = saved[name]["state"]
        if isinstance(gen, torch.Generator):
            gen.set_state(saved_state.clone())
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = saved_state
        else:
            gen.setstate(saved_state)
