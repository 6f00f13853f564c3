"""Tuning one setting per configuration and task (``lorafit report --tune learning_rate``).

The protocol it reads: each configuration is run on one seed at several values of the tuned
setting; the value with the best dev result (best epoch) is chosen per task; more seeds are run at
the chosen value only. The report then gives the median over every seed run at that value.

Rules, so that the choice is reproducible from the run directories alone:

- the *search seed* of a configuration and task is the seed run at the most values of the tuned
  setting, the lowest of those on a tie (normally seed 0, run at every value);
- the chosen value is the one where the search seed's run is best; on a tie the lowest value wins
  (for a learning rate, the more conservative choice);
- a choice at the lowest or highest searched value is flagged: the best may lie outside the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafit.config import FIELD_NAMES, NOT_SETTINGS
from lorafit.errors import LorafitError
from lorafit.report.runs import Group, Run
from lorafit.settings import freeze


def check_tunable(name: str) -> None:
    """Refuse a ``--tune`` field that no run can be tuned on.

    Raises:
        LorafitError: ``name`` is not a TrainConfig field, or one that never tells configurations
            apart (the task, the seed, or how a run was executed).
    """
    if name not in FIELD_NAMES:
        raise LorafitError(f"--tune {name}: not a training setting (a TrainConfig field, e.g. learning_rate)")
    if name == "task" or name in NOT_SETTINGS:
        raise LorafitError(f"--tune {name}: not a setting that is tuned (task, seeds and runtime options are not)")


def value_order(value: Any) -> tuple:
    """Numbers in numeric order (1e-05 before 0.0001), anything else after them as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


@dataclass
class Choice:
    """The search over the tuned setting for one configuration on one task, and what it picked."""

    field: str
    candidates: dict[Any, Group]  # tuned value -> the runs at that value (every seed)
    search_seed: Any
    chosen: Any
    group: Group  # the runs at the chosen value, with the tuned field left out of its settings

    @property
    def task(self) -> str:
        return self.group.task

    @property
    def values(self) -> list[Any]:
        """The tuned values the search seed was run at, in order."""
        return sorted((v for v in self.candidates if self.search_value(v) is not None), key=value_order)

    @property
    def at_edge(self) -> bool:
        """The chosen value is the lowest or highest of 2+ numeric values searched."""
        values = self.values
        numeric = all(value_order(v)[0] == 0 for v in values)
        return numeric and len(values) > 1 and self.chosen in (values[0], values[-1])

    def search_run(self, value: Any) -> Run | None:
        """The search seed's run at ``value``, or None where that seed was not run there."""
        group = self.candidates.get(value)
        return None if group is None else _run_of_seed(group, self.search_seed)

    def search_value(self, value: Any) -> float | None:
        run = self.search_run(value)
        return None if run is None else run.value


def _run_of_seed(group: Group, seed: Any) -> Run | None:
    return next((r for r in group.runs if r.config.get("seed") == seed and r.value is not None), None)


def _search_seed(candidates: dict[Any, Group]) -> Any:
    counts: dict[Any, int] = {}
    for group in candidates.values():
        for seed in set(group.seeds):
            counts[seed] = counts.get(seed, 0) + 1
    return min(counts, key=lambda s: (-counts[s], value_order(s)))


def tune_groups(groups: list[Group], field: str) -> list[Choice]:
    """One :class:`Choice` per configuration and task, where a configuration is a group's settings
    without ``field``. Groups that differ only in ``field`` are the candidates of one search."""
    searches: dict[tuple, dict[Any, Group]] = {}
    for g in groups:
        rest = {k: v for k, v in g.settings.items() if k != field}
        searches.setdefault(freeze(rest), {})[freeze(g.settings.get(field))] = g
    choices = []
    for candidates in searches.values():
        seed = _search_seed(candidates)
        searched = {v: run.value for v, g in candidates.items() if (run := _run_of_seed(g, seed)) is not None}
        # max() keeps the first of equal values, so ordering by value first makes the lowest win a tie.
        chosen = max(sorted(searched, key=value_order), key=lambda v: searched[v])
        best = candidates[chosen]
        group = Group({k: v for k, v in best.settings.items() if k != field}, best.runs)
        choices.append(Choice(field, candidates, seed, chosen, group))
    return choices
