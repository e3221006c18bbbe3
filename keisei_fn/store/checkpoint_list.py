"""CheckpointList: what ``list_checkpoints`` returns — a list of metas that prints as a table
and plots the metrics its checkpoints recorded.

A metric is a key of the checkpoints' ``extra`` whose value is a number (the demo records
``train_legal_mass`` and ``heldout_legal_mass``; a training loop might record ``loss``).
Plotting needs matplotlib (``pip install 'keisei-fn[notebook]'``), imported only by
:meth:`CheckpointList.plot`.

Example:
    >>> from keisei_fn import GameStats
    >>> def meta(step, **extra):
    ...     return CheckpointMeta(path=f"run/checkpoint_ts{step}", name=f"checkpoint_ts{step}",
    ...         format_version=3, kind="periodic", step=step, episodes=0, stats=GameStats(),
    ...         spec=None, weights_size=1000, weights_digest="blake3:00", digest="blake3:11",
    ...         created="?", extra=extra)
    >>> listed = CheckpointList([meta(10, loss=0.5), meta(20, loss=0.25)])
    >>> listed.metrics(), listed.series("loss")
    (('loss',), ((10, 20), (0.5, 0.25)))
    >>> print(listed)
    name             step  kind      size    age  loss
    checkpoint_ts10  10    periodic  1.0 kB  ?    0.5
    checkpoint_ts20  20    periodic  1.0 kB  ?    0.25
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keisei_fn.display import format_value, html_table, human_age, human_bytes, render_table
from keisei_fn.errors import MissingExtraError, SpecError
from keisei_fn.meta import CheckpointMeta

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CheckpointList", "summary_row"]

#: The columns every listing has (``keisei-fn ls`` shows the same first five).
SUMMARY_HEADER = ("name", "step", "kind", "size", "age")


def summary_row(meta: CheckpointMeta) -> list[str]:
    """A checkpoint's cells under :data:`SUMMARY_HEADER`: name, step, kind (with its shard
    count), size on disk, age.

    Example:
        >>> from keisei_fn import GameStats
        >>> meta = CheckpointMeta(path="run/final_model", name="final_model", format_version=3,
        ...     kind="final_model", step=5, episodes=0, stats=GameStats(), spec=None,
        ...     weights_size=1500, weights_digest="blake3:00", digest="blake3:11", created="?")
        >>> summary_row(meta)
        ['final_model', '5', 'final_model', '1.5 kB', '?']
    """
    kind = f"{meta.kind} ({meta.world_size} shards)" if meta.sharded else meta.kind
    return [
        meta.name,
        str(meta.step),
        kind,
        human_bytes(meta.total_bytes),
        human_age(meta.created),
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class CheckpointList(list[CheckpointMeta]):
    """A run directory's checkpoints, sorted by step: a ``list`` of :class:`CheckpointMeta`
    that prints as a table (``print(...)``, and an HTML table in Jupyter) and plots the metrics
    its checkpoints recorded (:meth:`plot`). ``repr`` and every list operation are a list's.
    """

    __slots__ = ()

    def metrics(self) -> tuple[str, ...]:
        """The keys of the checkpoints' ``extra`` that hold a number, in first-seen order."""
        found = {k: None for m in self for k, v in m.extra.items() if _is_number(v)}
        return tuple(found)

    def series(self, metric: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """``(steps, values)`` of one metric, over the checkpoints that recorded it.

        Raises:
            SpecError: no checkpoint recorded ``metric`` as a number.
        """
        points = [(m.step, float(m.extra[metric])) for m in self if _is_number(m.extra.get(metric))]
        if not points:
            raise SpecError(
                f"no checkpoint recorded a number under extra[{metric!r}]; the metrics these "
                f"checkpoints recorded: {list(self.metrics()) or 'none'}"
            )
        steps, values = zip(*points, strict=True)
        return steps, values

    def _table(self) -> tuple[list[str], list[list[str]]]:
        metrics = self.metrics()
        checked = any(m.health is not None for m in self)  # the health gate was on
        rows = [
            summary_row(m)
            + ([m.health_mark] if checked else [])
            + [format_value(m.extra[k]) if k in m.extra else "-" for k in metrics]
            for m in self
        ]
        return [*SUMMARY_HEADER, *(["health"] if checked else []), *metrics], rows

    def __str__(self) -> str:
        """A table: name, step, kind, size, age, ``health`` when the health gate checked any
        of them (see :attr:`CheckpointMeta.health_mark`), then one column per metric."""
        if not self:
            return "no checkpoints"
        return render_table(*self._table())

    def _repr_html_(self) -> str:
        """The same table as HTML, for Jupyter."""
        return html_table(*self._table(), caption=f"{len(self)} checkpoints")

    def plot(self, metrics: Sequence[str] | None = None, *, ax: Axes | None = None) -> Axes:
        """Plot metrics over steps, one line per metric (needs matplotlib).

        Args:
            metrics: keys of the checkpoints' ``extra`` (default: every one holding a number,
                see :meth:`metrics`).
            ax: the matplotlib axes to draw on (default: a new figure's).

        Returns:
            The axes, with a line per metric (x: step, y: value; labelled by the metric) and
            a legend.

        Raises:
            MissingExtraError: matplotlib is not installed (``keisei-fn[notebook]``).
            SpecError: a metric no checkpoint recorded, or no metric at all.
        """
        chosen = tuple(self.metrics() if metrics is None else metrics)
        if not chosen:
            raise SpecError("nothing to plot: no checkpoint recorded a number in its extra")
        lines = {metric: self.series(metric) for metric in chosen}
        if ax is None:
            try:
                import matplotlib.pyplot as plt
            except ImportError as exc:
                raise MissingExtraError(
                    "CheckpointList.plot needs matplotlib: pip install 'keisei-fn[notebook]'"
                ) from exc
            ax = plt.subplots()[1]
        for metric, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o", label=metric)
        ax.set_xlabel("step")
        ax.legend()
        return ax
