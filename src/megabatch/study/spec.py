"""Study specs: which methods (recipes) to run at which global batches and seeds.

A spec is a TOML file (built-in ones in ``megabatch/specs``)::

    description = "..."
    epochs = 90                 # epoch budget of every run
    batches = [512, 2048, 8192, 16384]
    seeds = [0]
    extra_seeds = [1]           # also run these seeds ...
    extra_seeds_from = 8192     # ... at batches >= this
    set = ["data.augment=false"]  # --set overrides for every run

    [methods.baseline]
    recipe = "fashion-mnist-baseline"
    batches = [128]             # its own batches instead of the study's
    [methods.paper-no-rmsprop]
    recipe = "fashion-mnist-paper-no-rmsprop"
    largest_only = true         # only at the study's largest batch
    ablation_of = "paper"       # drawn in the ablation bars beside "paper"
    seeds = [0]                 # its own seeds instead of the study's

Tuning (Shallue et al. 2019: a tuning budget decides such comparisons)::

    lr_factors = [0.5, 1.0, 2.0]  # every run at these multiples of its recipe's lr_per_256
    set = ["data.validation_images=6000"]  # chosen on held-out training images

Each cell then reports the test top-1 of the factor whose validation top-1 is best
(:func:`megabatch.study.tuning.tuned`); a method may give its own ``lr_factors``.
Tuning without ``data.validation_images`` is refused: it would tune on the test set.
One seed chooses; more seeds then say how far the chosen factor's result is luck::

    confirm_seeds = [1, 2]  # once a cell has chosen, its factor runs again at these seeds

The cell's test top-1 is then the mean over all its seeds at that factor. The choice
stays that of the tuning seeds alone, so it is made once and never revised. A best
factor at the edge of those tried may be bettered past it::

    widen_edges = 2  # a cell whose best is its largest (smallest) factor tries one more
                     # beyond it (x4 after x2, x0.25 after x0.5), up to 2 more, then chooses;
                     # one whose every factor diverged tries below its smallest
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from megabatch import recipe as recipes, tomlfile
from megabatch.data import train_size
from megabatch.errors import UserError
from megabatch.typed import Count, Positive, PositiveFloat, build, derived


@dataclass(frozen=True, kw_only=True)
class Method:
    """A ``[methods.NAME]`` table: a recipe and where it runs in the grid."""

    recipe: str
    name: str = derived("")  # the table's NAME
    batches: tuple[Positive, ...] = ()  # empty: the study's batches
    largest_only: bool = False
    ablation_of: str = ""
    set: tuple[str, ...] = ()
    seeds: tuple[Count, ...] = ()  # empty: the study's seeds (and extra seeds)
    lr_factors: tuple[PositiveFloat, ...] = ()  # empty: the study's
    lr_per_256: float = derived(0.0)  # its recipe's (with the spec's and its own overrides), which factors multiply


@dataclass(frozen=True)
class Run:
    """One run of the grid: a cell (method, batch) at one seed and learning-rate factor."""

    method: Method
    batch: int
    seed: int
    lr_factor: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.method.name}/b{self.batch}-s{self.seed}" + (
            f"-lr{self.lr_factor:g}" if self.lr_factor != 1.0 else "")


@dataclass(frozen=True)
class StudySpec:
    """A spec file's top level; its ``[methods.NAME]`` tables become ``methods``."""

    name: str = derived("")  # the file's name
    description: str = ""
    methods: tuple[Method, ...] = derived(())
    batches: tuple[Positive, ...] = ()
    epochs: Positive = 90
    seeds: tuple[Count, ...] = (0,)
    extra_seeds: tuple[Count, ...] = ()
    extra_seeds_from: Count = 0
    set: tuple[str, ...] = ()
    only_seeds: tuple[int, ...] = derived(())  # a reduced grid: just these seeds of each cell
    only_methods: tuple[str, ...] = derived(())  # a reduced grid: just these methods
    lr_factors: tuple[PositiveFloat, ...] = (1.0,)  # multiples of each recipe's lr_per_256 (tuning)
    confirm_seeds: tuple[Count, ...] = ()  # with tuning: seeds that rerun each cell's chosen factor
    widen_edges: Count = 0  # with tuning: factors a cell may add beyond the edge of its best

    def cells(self) -> list[tuple[Method, int]]:
        """Every (method, batch) of the grid, in the spec's order."""
        return [(method, batch) for method in self.methods
                if not self.only_methods or method.name in self.only_methods
                for batch in ((max(self.batches),) if method.largest_only else method.batches or self.batches)]

    def cell_seeds(self) -> dict[tuple[str, int], tuple[int, ...]]:
        """Each cell's seeds (extra seeds at large batches); with tuning, those that choose."""
        return {(method.name, batch): tuple(dict.fromkeys(method.seeds or self.seeds + (
                    self.extra_seeds if batch >= self.extra_seeds_from else ())))
                for method, batch in self.cells()}

    def seeds_of(self, method: Method, batch: int) -> list[int]:
        """The cell's seeds that this (perhaps --seeds reduced) grid runs."""
        return [seed for seed in self.cell_seeds()[method.name, batch]
                if not self.only_seeds or seed in self.only_seeds]

    def runs(self) -> list[Run]:
        """The grid: every method at its batches, every seed and learning-rate factor; with
        tuning, the runs that choose (widenings and confirmations come after)."""
        return [Run(method, batch, seed, factor) for method, batch in self.cells()
                for seed in self.seeds_of(method, batch) for factor in self.factors(method)]

    def widenings(self, widen: dict[tuple[str, int], float]) -> list[Run]:
        """The tuning runs at the factor each cell at an edge must try (``widen``), the largest
        batches first."""
        runs = [Run(method, batch, seed, widen[method.name, batch]) for method, batch in self.cells()
                if (method.name, batch) in widen for seed in self.seeds_of(method, batch)]
        return sorted(runs, key=lambda run: -run.batch)

    def confirming_seeds(self) -> tuple[int, ...]:
        return tuple(s for s in self.confirm_seeds if not self.only_seeds or s in self.only_seeds)

    def confirmations(self, chosen: dict[tuple[str, int], float]) -> list[Run]:
        """The confirmation runs of the cells that have chosen their factor (``chosen``): the
        largest batches first, where the methods part ways and one run says least, and there
        every cell's first confirmation seed before any second."""
        seeds = self.confirming_seeds()
        runs = [Run(method, batch, seed, chosen[method.name, batch]) for method, batch in self.cells()
                if (method.name, batch) in chosen for seed in seeds]
        return sorted(runs, key=lambda run: (-run.batch, seeds.index(run.seed)))

    def total(self) -> int:
        """How many runs the study plans: the grid's and the confirmations'."""
        return len(self.runs()) + len(self.cells()) * len(self.confirming_seeds())

    def factors(self, method: Method) -> tuple[float, ...]:
        """The learning-rate factors ``method`` runs at."""
        return method.lr_factors or self.lr_factors

    @property
    def tuning(self) -> bool:
        return any(self.factors(m) != (1.0,) for m in self.methods)

    def planned(self) -> Counter[tuple[str, int]]:
        """How many seeds the study plans for each (method, batch) cell, confirmations included."""
        return Counter((m, b) for m, b, _ in dict.fromkeys(
            [(run.method.name, run.batch, run.seed) for run in self.runs()]
            + [(method.name, batch, seed) for method, batch in self.cells() for seed in self.confirming_seeds()]))

    def whole(self) -> StudySpec:
        """The grid that a reduction to some methods or seeds takes its runs from."""
        return replace(self, only_seeds=(), only_methods=())

    def overrides(self, run: Run) -> list[str]:
        lr = ([f"optimizer.lr_per_256={run.method.lr_per_256 * run.lr_factor!r}"]
              if run.lr_factor != 1.0 else [])
        return [*self.set, *run.method.set, f"batch.global_batch={run.batch}", f"train.seed={run.seed}",
                f"train.epochs={self.epochs}", *lr]


def builtin_names() -> list[str]:
    return tomlfile.builtin_names("specs")


def _distinct(factors: tuple[float, ...], where: str) -> tuple[float, ...]:
    if len(set(factors)) != len(factors):
        raise UserError(f"study spec key {where}lr_factors repeats a value: {list(factors)!r}")
    return factors


def load_spec(name_or_path: str, epochs: int | None = None, batches: list[int] | None = None,
              seeds: list[int] | None = None, extra_set: list[str] = (),
              methods: list[str] | None = None) -> StudySpec:
    """Load a built-in spec or a TOML file; ``epochs``/``batches``/``seeds``/``methods``
    replace the spec's (a reduced grid: ``seeds`` keeps, of every cell's seeds, those
    listed; ``methods`` keeps those methods' runs, which are the full grid's) and
    ``extra_set`` is applied to every run after the spec's own overrides. Every method's
    recipe is loaded once to catch mistakes before running."""
    data = tomlfile.read(name_or_path, "specs", "study spec")
    tables = data.pop("methods", None)
    top = build(StudySpec, data, "study spec", handled=("methods",))
    if tables is not None and not isinstance(tables, dict):
        raise UserError(f"study spec key methods must be tables [methods.NAME], got {tables!r}")
    if not tables:
        raise UserError(f"study spec {name_or_path} has no [methods.NAME] tables")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs {epochs}: give a positive number of epochs")
    if batches and min(batches) < 1:
        raise UserError(f"--batches {','.join(map(str, batches))}: give positive global batches")
    shared, chosen = (*top.set, *extra_set), []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"study spec key methods.{name} must be a table [methods.{name}], got {table!r}")
        method = build(Method, table, "study spec", f"methods.{name}.")
        base = recipes.load(method.recipe, [*shared, *method.set])
        chosen.append(replace(method, name=name, lr_per_256=base.optimizer.lr_per_256,
                               lr_factors=_distinct(method.lr_factors, f"methods.{name}.")))
    spec = replace(top, name=Path(name_or_path).stem, methods=tuple(chosen), batches=tuple(batches or top.batches),
                   epochs=epochs or top.epochs, set=shared, only_seeds=tuple(seeds or ()),
                   only_methods=tuple(methods or ()), lr_factors=_distinct(top.lr_factors, "") or (1.0,),
                   confirm_seeds=tuple(dict.fromkeys(top.confirm_seeds)))
    if not spec.batches:
        raise UserError(f"study spec {name_or_path} needs batches = [...]")
    names = {m.name for m in spec.methods}
    if unknown := [m for m in spec.only_methods if m not in names]:
        raise UserError(f"--methods: {', '.join(unknown)} not in study spec {name_or_path}; "
                        f"its methods: {', '.join(names)}")
    if spec.confirm_seeds and not spec.tuning:
        raise UserError(f"study spec {name_or_path}: confirm_seeds rerun the learning-rate factor that tuning "
                        f"chose, but the spec tunes nothing: give lr_factors, or list the seeds in seeds")
    if spec.widen_edges and not spec.tuning:
        raise UserError(f"study spec {name_or_path}: widen_edges tries learning-rate factors beyond the best "
                        f"of lr_factors, but the spec tunes nothing: give lr_factors = [0.5, 1.0, 2.0], say")
    if overlap := sorted({run.seed for run in spec.whole().runs()} & set(spec.confirm_seeds)):
        raise UserError(f"study spec {name_or_path}: seed {overlap[0]} is both a tuning seed and in "
                        f"confirm_seeds: a confirmation must be a seed that did not choose")
    if spec.only_seeds and not spec.runs() and not spec.confirming_seeds():
        seeds_planned = sorted({run.seed for run in spec.whole().runs()} | set(spec.confirm_seeds))
        raise UserError(f"--seeds {','.join(map(str, spec.only_seeds))}: no run of study spec {name_or_path} has "
                        f"these seeds; its seeds: {', '.join(map(str, seeds_planned))}")
    for method in spec.methods:
        if method.ablation_of and method.ablation_of not in names:
            raise UserError(f"method {method.name}: ablation_of = {method.ablation_of!r} is not a method")
    for run in spec.runs() + spec.confirmations({(m.name, b): spec.factors(m)[0] for m, b in spec.cells()}):
        recipe = recipes.load(run.method.recipe, spec.overrides(run))  # fail now, not hours in
        if spec.factors(run.method) != (1.0,) and not recipe.data.validation_images:
            raise UserError(f"study spec {name_or_path}: method {run.method.name} tunes lr_factors but holds "
                            f"out no validation images: add \"data.validation_images=N\" to the spec's set "
                            f"(choosing on the test set would tune on the test set)")
        if train_size(recipe.data) < recipe.batch.global_batch:
            held = (f" after data.validation_images = {recipe.data.validation_images}"
                    if recipe.data.validation_images else "")
            raise UserError(f"study spec {name_or_path}: {run.key} has {max(train_size(recipe.data), 0)} "
                            f"training images{held}, fewer than its global batch {recipe.batch.global_batch}: "
                            f"train on more (data.train_subset) or hold out fewer")
    return spec
