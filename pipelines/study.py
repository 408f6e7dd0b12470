"""``twotower study``: which negatives, which loss, which similarity, answered on one dataset.

Legend: R train rows, N data negatives per row in the study dataset, K data negatives per row
a cell trains with.

A *cell* is (negative mix, loss, similarity, seed): one small training run of the grid's base
config in one process (``pipelines.local_train``), then the core retrieval metrics on the
dataset's eval split (full catalog, train positives excluded). Every cell of a study trains on
the same train rows for the same epochs with the same batch, so the same number of steps and
examples: only its negatives, loss, similarity and seed differ.

Negative mixes:

- a data mix, e.g. ``ranked_out`` or ``exposed_not_clicked+unexposed``: the dataset's
  negatives of those sources only. Every data mix uses K = ``data_negatives`` per positive,
  split evenly over its sources (the remainder to the first ones, in ``NEGATIVE_SOURCES``
  order); a row short of a source is filled from its ``unexposed`` negatives, as build-dataset
  fills a shortfall. That is the dataset a build with those per-source counts would have
  given, so the study builds one dataset with K negatives of every source and each cell
  selects its own (``select_negatives``).
- ``in_batch``: the other rows' positives, no data negatives (``in_batch_softmax`` with logQ
  correction, or a pairwise loss on the in-batch columns).
- ``mixed``: in-batch plus ``sampled_negatives`` catalog samples per step drawn
  ∝ (count + 1)^``sampler_alpha``, each part with its own logQ (mixed negative sampling).

Combinations that do not mean what their name says are dropped by ``expand_grid`` with the
reason (``incompatibility``), never silently. A cell's config is a complete run config with the
mix written as ``dataset.negatives`` counts and ``loss`` settings, so the best one can be
trained as it is with ``twotower train``.

Each finished cell is ``<out>/cells/<cell_id>/result.json`` (published with ``_SUCCESS``);
``cell_id`` is derived from the cell's config, so a rerun or a changed grid skips every cell
already done. ``run_cells`` runs cells as Ray tasks of one CPU each; the driver only submits
and collects small dicts. ``summarize`` ranks configurations by mean Recall@50 over seeds, and
``render_markdown`` / ``plot_*`` write the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import io
from pipelines.report import _number, _png_bytes, _table, _write_bytes
from twotower_core.config import (
    NEGATIVE_SOURCES,
    Config,
    ConfigError,
    DatasetConfig,
    config_from_dict,
    config_to_dict,
)
from twotower_core.losses import LOSSES, loss_family
from twotower_core.similarity import SIMILARITIES

MIX_IN_BATCH = "in_batch"
MIX_MIXED = "mixed"
SOURCE_LABELS = {"exposed_not_clicked": "enc", "ranked_out": "ro", "unexposed": "unx"}
FAMILIES: tuple[str, ...] = ("pointwise", "pairwise", "listwise")
HEADLINE = "recall@50"
REQUIRED_KS: tuple[int, ...] = (10, 50)
# Bumped when what a cell computes changes, so old results are not reused for new ones.
CELL_FORMAT = 1
CELLS_DIR = "cells"
RESULT_FILE = "result.json"
GRID_KEYS: tuple[str, ...] = (
    "base", "data_negatives", "sampled_negatives", "sampler_alpha", "mixes", "losses",
    "similarities", "seeds", "overrides",
)  # fmt: skip
MATCH_KEYS: tuple[str, ...] = ("mix", "loss", "family", "similarity")


class StudyGridError(ValueError):
    """A study grid key is unknown or its value is invalid; the message names the key."""


# ---------------------------------------------------------------------------------------------
# mixes


def parse_mix(text: str, *, key: str = "mixes") -> str:
    """The canonical name of a mix: ``in_batch``, ``mixed``, or sources joined by ``+`` in
    ``NEGATIVE_SOURCES`` order. ValueError naming ``key`` otherwise."""
    if text in (MIX_IN_BATCH, MIX_MIXED):
        return text
    parts = [part.strip() for part in str(text).split("+")]
    unknown = [part for part in parts if part not in NEGATIVE_SOURCES]
    if unknown:
        valid = ", ".join((*NEGATIVE_SOURCES, MIX_IN_BATCH, MIX_MIXED))
        raise StudyGridError(
            f"{key}: unknown negative source {unknown[0]!r} in {text!r}; valid: {valid} "
            "(data sources may be joined with +)"
        )
    if len(set(parts)) != len(parts):
        raise StudyGridError(f"{key}: {text!r} names a source twice")
    return "+".join(source for source in NEGATIVE_SOURCES if source in parts)


def mix_sources(mix: str) -> tuple[str, ...]:
    """The data sources of a mix (none for ``in_batch`` / ``mixed``)."""
    if mix in (MIX_IN_BATCH, MIX_MIXED):
        return ()
    return tuple(mix.split("+"))


def mix_label(mix: str) -> str:
    """Short name for tables and plots: ``enc+ro``, ``in_batch``, ``mixed``."""
    sources = mix_sources(mix)
    return "+".join(SOURCE_LABELS[s] for s in sources) if sources else mix


def mix_counts(mix: str, data_negatives: int) -> dict[str, int]:
    """Data negatives per source of a mix: K split evenly, the remainder to the first sources."""
    sources = mix_sources(mix)
    counts = dict.fromkeys(NEGATIVE_SOURCES, 0)
    if not sources:
        return counts
    share, remainder = divmod(data_negatives, len(sources))
    for position, source in enumerate(sources):
        counts[source] = share + (1 if position < remainder else 0)
    return counts


def select_negatives(
    neg_item_idx_RN: torch.Tensor, neg_source_RN: torch.Tensor, counts: Mapping[str, int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's first ``counts[s]`` negatives of every source s, a shortfall of
    ``exposed_not_clicked`` / ``ranked_out`` filled from the row's ``unexposed`` ones.

    Args:
        neg_item_idx_RN: [R, N] the dataset's negatives.
        neg_source_RN: [R, N] their source codes (indices into ``NEGATIVE_SOURCES``).
        counts: negatives per source name to keep (missing = 0).

    Returns:
        ([R, K] items, [R, K] source codes, number of fills), rows keeping their order.
    """
    num_rows = neg_item_idx_RN.shape[0]
    keep_RN = torch.zeros_like(neg_source_RN, dtype=torch.bool)
    shortfall_R = torch.zeros(num_rows, dtype=torch.long)
    unexposed = NEGATIVE_SOURCES.index("unexposed")
    for code, source in enumerate(NEGATIVE_SOURCES):
        is_source_RN = neg_source_RN == code
        have_R = is_source_RN.sum(dim=1)
        want = int(counts.get(source, 0))
        if code == unexposed:
            want_R = want + shortfall_R
            if bool((want_R > have_R).any()):
                raise ValueError(
                    f"a train row has {int(have_R.min())} unexposed negatives, fewer than the "
                    f"{int(want_R.max())} a mix needs: build the dataset with more "
                    "dataset.negatives.unexposed"
                )
        else:
            want_R = have_R.clamp(max=want)
            shortfall_R += want - want_R
        rank_RN = is_source_RN.cumsum(dim=1) - 1
        keep_RN |= is_source_RN & (rank_RN < want_R.unsqueeze(1))
    num_kept = sum(int(counts.get(source, 0)) for source in NEGATIVE_SOURCES)
    assert bool((keep_RN.sum(dim=1) == num_kept).all()), "every row keeps K negatives"
    # Boolean indexing keeps row-major order and every row keeps K, so [R·K] → [R, K].
    return (
        neg_item_idx_RN[keep_RN].view(num_rows, num_kept),
        neg_source_RN[keep_RN].view(num_rows, num_kept),
        int(shortfall_R.sum()),
    )


# ---------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Override:
    """Config values (``section.key`` → value) for the cells whose fields match."""

    match: dict[str, tuple[Any, ...]]
    values: dict[str, Any]

    def applies(self, *, mix: str, loss: str, similarity: str) -> bool:
        fields = {"mix": mix, "loss": loss, "family": loss_family(loss), "similarity": similarity}
        return all(fields[key] in allowed for key, allowed in self.match.items())


@dataclass(frozen=True)
class StudyGrid:
    """A validated grid (see ``jobs/configs/study/grid.yaml`` for each field)."""

    base: dict[str, Any]
    data_negatives: int
    sampled_negatives: int
    sampler_alpha: float
    mixes: tuple[str, ...]
    losses: tuple[str, ...]
    similarities: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[Override, ...] = ()

    def base_config(self) -> Config:
        return config_from_dict(self.base)

    def dataset_config(self) -> DatasetConfig:
        """build-dataset settings of the study dataset: K negatives of every source."""
        dataset = dict(self.base.get("dataset", {}))
        dataset["negatives"] = {
            **dataset.get("negatives", {}),
            **dict.fromkeys(NEGATIVE_SOURCES, self.data_negatives),
        }
        return config_from_dict({**self.base, "dataset": dataset}).dataset

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.base_config().train.eval_ks)


def _names(value: Any, key: str, valid: Iterable[str]) -> tuple[str, ...]:
    valid = sorted(valid)
    if not isinstance(value, list) or not value:
        raise StudyGridError(f"{key}: expected a non-empty list, got {value!r}")
    for position, name in enumerate(value):
        if name not in valid:
            raise StudyGridError(
                f"{key}[{position}]: unknown value {name!r}; valid: {', '.join(valid)}"
            )
    if len(set(value)) != len(value):
        raise StudyGridError(f"{key}: lists a value twice")
    return tuple(value)


def _integer(value: Any, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StudyGridError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _override(entry: Any, key: str) -> Override:
    if not isinstance(entry, dict) or set(entry) - {"match", "set"} or "set" not in entry:
        raise StudyGridError(f"{key}: expected a mapping with 'match' and 'set', got {entry!r}")
    match_spec = entry.get("match") or {}
    if not isinstance(match_spec, dict):
        raise StudyGridError(f"{key}.match: expected a mapping, got {match_spec!r}")
    valid = {
        "mix": None,
        "loss": LOSSES,
        "family": FAMILIES,
        "similarity": SIMILARITIES,
    }
    match: dict[str, tuple[Any, ...]] = {}
    for name, allowed in match_spec.items():
        if name not in valid:
            raise StudyGridError(
                f"{key}.match: unknown key {name!r}; valid: {', '.join(MATCH_KEYS)}"
            )
        values = allowed if isinstance(allowed, list) else [allowed]
        if name == "mix":
            values = [parse_mix(v, key=f"{key}.match.mix") for v in values]
        else:
            values = list(_names(values, f"{key}.match.{name}", valid[name]))
        match[name] = tuple(values)
    values = entry["set"]
    if not isinstance(values, dict) or not values:
        raise StudyGridError(f"{key}.set: expected a mapping of section.key: value, got {values!r}")
    return Override(match=match, values={str(k): v for k, v in values.items()})


def grid_from_dict(data: Mapping[str, Any]) -> StudyGrid:
    """Validate a grid (parsed YAML). StudyGridError names the bad key, before any work starts;
    every cell's config is validated too, so a bad ``base`` or override value fails here."""
    if not isinstance(data, Mapping):
        raise StudyGridError(f"a study grid is a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise StudyGridError(
            f"unknown grid key {unknown[0]!r}; valid keys: {', '.join(sorted(GRID_KEYS))}"
        )
    for required in ("mixes", "losses", "similarities", "seeds"):
        if required not in data:
            raise StudyGridError(f"grid key {required!r} is required")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise StudyGridError(f"base: expected a run config mapping, got {base!r}")
    try:
        base_config = config_from_dict(base)
    except ConfigError as error:
        raise StudyGridError(f"base.{error}") from None
    missing_ks = [k for k in REQUIRED_KS if k not in base_config.train.eval_ks]
    if missing_ks:
        raise StudyGridError(
            f"base.train.eval_ks: must include {', '.join(map(str, REQUIRED_KS))} "
            f"(the report's Recall@10/50 and NDCG@10), got {list(base_config.train.eval_ks)}"
        )
    mixes_value = data["mixes"]
    if not isinstance(mixes_value, list) or not mixes_value:
        raise StudyGridError(f"mixes: expected a non-empty list, got {mixes_value!r}")
    mixes = tuple(parse_mix(m, key=f"mixes[{i}]") for i, m in enumerate(mixes_value))
    if len(set(mixes)) != len(mixes):
        raise StudyGridError("mixes: lists a mix twice")
    seeds_value = data["seeds"]
    if not isinstance(seeds_value, list) or not seeds_value:
        raise StudyGridError(f"seeds: expected a non-empty list, got {seeds_value!r}")
    seeds = tuple(_integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(seeds_value))
    if len(set(seeds)) != len(seeds):
        raise StudyGridError("seeds: lists a seed twice")
    data_negatives = _integer(data.get("data_negatives", 6), "data_negatives", minimum=1)
    widest = max((len(mix_sources(m)) for m in mixes), default=0)
    if data_negatives < widest:
        raise StudyGridError(
            f"data_negatives: {data_negatives} cannot give each of the {widest} sources of a "
            "mix at least one negative"
        )
    sampled_negatives = _integer(data.get("sampled_negatives", 64), "sampled_negatives", minimum=0)
    if MIX_MIXED in mixes and sampled_negatives < 1:
        raise StudyGridError("sampled_negatives: must be >= 1 when mixes include 'mixed'")
    sampler_alpha = data.get("sampler_alpha", 0.0)
    if isinstance(sampler_alpha, bool) or not isinstance(sampler_alpha, int | float):
        raise StudyGridError(f"sampler_alpha: expected a number, got {sampler_alpha!r}")
    if sampler_alpha < 0:
        raise StudyGridError(f"sampler_alpha: must be >= 0, got {sampler_alpha}")
    overrides_value = data.get("overrides") or []
    if not isinstance(overrides_value, list):
        raise StudyGridError(f"overrides: expected a list, got {overrides_value!r}")
    grid = StudyGrid(
        base=dict(base),
        data_negatives=data_negatives,
        sampled_negatives=sampled_negatives,
        sampler_alpha=float(sampler_alpha),
        mixes=mixes,
        losses=_names(data["losses"], "losses", LOSSES),
        similarities=_names(data["similarities"], "similarities", SIMILARITIES),
        seeds=seeds,
        overrides=tuple(_override(o, f"overrides[{i}]") for i, o in enumerate(overrides_value)),
    )
    # Every combination's config, so a bad override value fails now, naming the override.
    for mix in grid.mixes:
        for loss in grid.losses:
            for similarity in grid.similarities:
                cell_config(grid, mix=mix, loss=loss, similarity=similarity, seed=grid.seeds[0])
    return grid


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def cell_config(grid: StudyGrid, *, mix: str, loss: str, similarity: str, seed: int) -> Config:
    """The complete run config of one cell: base + the mix as negatives counts and loss settings
    + loss, similarity, seed + the matching overrides (in grid order)."""
    data = _deep_merge(
        grid.base,
        {
            "dataset": {"negatives": mix_counts(mix, grid.data_negatives)},
            "loss": {
                "name": loss,
                "similarity": similarity,
                "use_data_negatives": bool(mix_sources(mix)),
                "num_sampled_negatives": grid.sampled_negatives if mix == MIX_MIXED else 0,
                **({"sampler_alpha": grid.sampler_alpha} if mix == MIX_MIXED else {}),
            },
            "train": {"seed": seed},
        },
    )
    for position, override in enumerate(grid.overrides):
        if not override.applies(mix=mix, loss=loss, similarity=similarity):
            continue
        for dotted, value in override.values.items():
            data = _deep_merge(data, _nest(dotted, value))
        try:
            config_from_dict(data)
        except ConfigError as error:
            raise StudyGridError(f"overrides[{position}].set: {error}") from None
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise StudyGridError(f"base.{error}") from None


# ---------------------------------------------------------------------------------------------
# expansion


def incompatibility(
    mix: str, loss: str, similarity: str, *, available_sources: Iterable[str]
) -> str | None:
    """Why a (mix, loss, similarity) is not run, or None when it is."""
    available = set(available_sources)
    missing = [source for source in mix_sources(mix) if source not in available]
    if missing:
        return f"the dataset has no {missing[0]} negatives"
    family = loss_family(loss)
    if mix in (MIX_IN_BATCH, MIX_MIXED) and family == "pointwise":
        return (
            "in-batch negatives are other rows' positives, drawn in proportion to popularity; "
            "a pointwise loss takes no logQ correction, so it would learn to push popular items down"
        )
    if loss == "in_batch_softmax" and mix not in (MIX_IN_BATCH, MIX_MIXED):
        return (
            "in_batch_softmax always adds in-batch negatives, so it would not train on this data "
            "mix alone (sampled_softmax is the listwise loss on data negatives)"
        )
    if loss == "sampled_softmax" and mix == MIX_IN_BATCH:
        return (
            "on in-batch negatives sampled_softmax computes in_batch_softmax, which the grid runs"
        )
    if mix == MIX_MIXED and loss != "in_batch_softmax":
        return (
            "the training job gives losses other than in_batch_softmax in-batch negatives only "
            "when a batch has no other negatives, so with catalog samples this would train on "
            "the samples alone"
        )
    if loss == "cosine_regression" and similarity != "cosine":
        return "cosine_regression regresses scores to ±1, a range only cosine scores have"
    if loss == "contrastive" and similarity != "euclidean":
        return (
            "contrastive is defined on distances: with dot or cosine d = -s, and d⁺² pulls "
            "positive scores to 0"
        )
    return None


@dataclass(frozen=True, eq=False)
class Cell:
    """One training run of the study."""

    mix: str
    loss: str
    similarity: str
    seed: int
    config: Config

    @property
    def family(self) -> str:
        return loss_family(self.loss)

    @property
    def key(self) -> tuple[str, str, str]:
        """The configuration this cell is one seed of."""
        return (self.mix, self.loss, self.similarity)

    @property
    def cell_id(self) -> str:
        """Stable: readable fields + a digest of the full config (the budget included)."""
        payload = json.dumps(
            {"format": CELL_FORMAT, "config": config_to_dict(self.config)}, sort_keys=True
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        return f"{mix_label(self.mix)}.{self.loss}.{self.similarity}.seed{self.seed}.{digest}"


@dataclass(frozen=True)
class Dropped:
    mix: str
    loss: str
    similarity: str
    reason: str


@dataclass(frozen=True)
class Expansion:
    cells: list[Cell]
    dropped: list[Dropped]

    @property
    def configurations(self) -> list[tuple[str, str, str]]:
        return list(dict.fromkeys(cell.key for cell in self.cells))


def expand_grid(
    grid: StudyGrid, *, available_sources: Iterable[str] = NEGATIVE_SOURCES
) -> Expansion:
    """Every (mix, loss, similarity, seed) of the grid, in grid order; incompatible
    combinations go to ``dropped`` with their reason."""
    available = tuple(available_sources)
    cells, dropped = [], []
    for mix in grid.mixes:
        for loss in grid.losses:
            for similarity in grid.similarities:
                reason = incompatibility(mix, loss, similarity, available_sources=available)
                if reason is not None:
                    dropped.append(Dropped(mix, loss, similarity, reason))
                    continue
                for seed in grid.seeds:
                    config = cell_config(grid, mix=mix, loss=loss, similarity=similarity, seed=seed)
                    cells.append(Cell(mix, loss, similarity, seed, config))
    return Expansion(cells=cells, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# running cells


def cell_dir(out: str, cell_id: str) -> str:
    return io.join(out, CELLS_DIR, cell_id)


def is_done(out: str, cell_id: str) -> bool:
    return io.is_complete(cell_dir(out, cell_id))


def read_result(out: str, cell_id: str) -> dict[str, Any]:
    return io.read_json(io.join(cell_dir(out, cell_id), RESULT_FILE))


def run_cell(dataset: str, cell: Cell, *, out: str) -> dict[str, Any]:
    """Train and score one cell in this process; publish ``<out>/cells/<id>/result.json``."""
    from pipelines import local_train
    from pipelines.train_loop import evaluate_model, load_eval_data

    torch.set_num_threads(cell.config.train.torch_threads or 1)
    started = time.perf_counter()
    rows = local_train.read_train_rows(dataset)
    counts = cell.config.dataset.negatives.counts()
    neg_item_idx, neg_source, fills = select_negatives(rows.neg_item_idx, rows.neg_source, counts)
    rows = local_train.TrainRows(rows.user_idx, rows.item_idx, neg_item_idx, neg_source)
    fitted = local_train.fit(dataset, cell.config, rows=rows)
    t = cell.config.train
    eval_data = load_eval_data(dataset, max_users=t.eval_max_users, seed=t.seed)
    metrics = evaluate_model(
        fitted.model,
        user_features=fitted.user_table,
        item_features=fitted.item_table,
        num_items=fitted.num_items,
        eval_data=eval_data,
        similarity=cell.similarity,
        ks=tuple(t.eval_ks),
    )
    final_loss = fitted.history[-1]["train_loss"] if fitted.history else math.nan
    num_kept = neg_item_idx.shape[1]
    result = {
        "cell_id": cell.cell_id,
        "mix": cell.mix,
        "loss": cell.loss,
        "family": cell.family,
        "similarity": cell.similarity,
        "seed": cell.seed,
        "metrics": metrics,
        "train_seconds": fitted.train_seconds,
        "seconds": time.perf_counter() - started,
        "steps": fitted.steps,
        "examples": fitted.examples,
        "epochs": t.epochs,
        "train_rows": rows.num_rows,
        "data_negatives_per_row": num_kept,
        "fill_share": fills / (rows.num_rows * num_kept) if num_kept else 0.0,
        "final_train_loss": final_loss,
        "diverged": not math.isfinite(final_loss),
        "history": fitted.history,
        "config": config_to_dict(cell.config),
        "finished_at": io.utc_now(),
    }
    with io.staged_output(
        cell_dir(out, cell.cell_id), overwrite=True, replace_incomplete=True
    ) as staging:
        io.write_json(io.join(staging, RESULT_FILE), result)
    return result


def _run_cell_task(dataset: str, cell: Cell, out: str) -> dict[str, Any]:
    """A Ray task: a failure comes back as a dict, so one bad cell does not stop the study."""
    try:
        return run_cell(dataset, cell, out=out)
    except Exception as error:  # reported per cell; the cell stays unfinished, a rerun retries
        return {"cell_id": cell.cell_id, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()}  # fmt: skip


def run_cells(
    dataset: str,
    cells: Sequence[Cell],
    *,
    out: str,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run cells as Ray tasks of one CPU each (Ray spreads them over the cluster's CPUs).

    Returns (results, errors by cell id). ``on_result`` sees each result as it arrives.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=1)(_run_cell_task)
    # Submitted in a seeded random order: on a shared machine a busy spell then slows cells of
    # many configurations a little instead of every seed of the first few (train seconds).
    order = list(cells)
    random.Random(0).shuffle(order)
    pending = {remote.remote(dataset, cell, out): cell for cell in order}
    results, errors = [], {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as error:  # the worker died (OOM, node lost)
            result = {"cell_id": cell.cell_id, "error": f"{type(error).__name__}: {error}"}
        if "error" in result:
            errors[cell.cell_id] = result["error"]
        else:
            results.append(result)
        if on_result is not None:
            on_result(result)
    return results, errors


# ---------------------------------------------------------------------------------------------
# aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); std 0 for a single value."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class ConfigSummary:
    """One configuration (mix, loss, similarity) over its seeds."""

    mix: str
    loss: str
    similarity: str
    seeds: tuple[int, ...]
    # metric -> (mean, std) over seeds
    metrics: dict[str, tuple[float, float]]
    train_seconds: tuple[float, float]
    fill_share: float
    diverged_seeds: int
    cell_ids: tuple[str, ...] = field(default=())

    @property
    def family(self) -> str:
        return loss_family(self.loss)

    @property
    def label(self) -> str:
        return f"{mix_label(self.mix)} · {self.loss} · {self.similarity}"

    @property
    def headline(self) -> float:
        return self.metrics[HEADLINE][0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mix": self.mix,
            "loss": self.loss,
            "family": self.family,
            "similarity": self.similarity,
            "seeds": list(self.seeds),
            "metrics": {k: list(v) for k, v in self.metrics.items()},
            "train_seconds": list(self.train_seconds),
            "fill_share": self.fill_share,
            "diverged_seeds": self.diverged_seeds,
            "cell_ids": list(self.cell_ids),
        }


def summarize(results: Iterable[Mapping[str, Any]]) -> list[ConfigSummary]:
    """Configurations ranked by mean Recall@50 over seeds (best first; ties by label)."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["mix"], result["loss"], result["similarity"]), []).append(result)
    summaries = []
    for (mix, loss, similarity), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        metric_names = [k for k in rows[0]["metrics"] if k != "eval_users"]
        summaries.append(
            ConfigSummary(
                mix=mix,
                loss=loss,
                similarity=similarity,
                seeds=tuple(r["seed"] for r in rows),
                metrics={k: mean_std([r["metrics"][k] for r in rows]) for k in metric_names},
                train_seconds=mean_std([r["train_seconds"] for r in rows]),
                fill_share=statistics.fmean(r.get("fill_share", 0.0) for r in rows),
                diverged_seeds=sum(bool(r.get("diverged")) for r in rows),
                cell_ids=tuple(r["cell_id"] for r in rows),
            )
        )
    return sorted(summaries, key=lambda s: (-s.headline, s.label))


AXES: dict[str, Callable[[ConfigSummary], str]] = {
    "negatives": lambda s: s.mix,
    "loss family": lambda s: s.family,
    "loss": lambda s: s.loss,
    "similarity": lambda s: s.similarity,
}


def axis_summary(ranking: Sequence[ConfigSummary], axis: str) -> list[dict[str, Any]]:
    """Per value of one axis: how many configurations, their mean Recall@50, and the best one.

    Rows are ordered by the best configuration's Recall@50.
    """
    value_of = AXES[axis]
    rows: dict[str, dict[str, Any]] = {}
    for summary in ranking:
        row = rows.setdefault(value_of(summary), {"value": value_of(summary), "summaries": []})
        row["summaries"].append(summary)
    out = []
    for row in rows.values():
        summaries = row["summaries"]
        best = max(summaries, key=lambda s: s.headline)
        out.append(
            {
                "value": row["value"],
                "configurations": len(summaries),
                "mean": statistics.fmean(s.headline for s in summaries),
                "best": best.headline,
                "best_std": best.metrics[HEADLINE][1],
                "best_label": best.label,
            }
        )
    return sorted(out, key=lambda r: -r["best"])


def pivot(ranking: Sequence[ConfigSummary]) -> tuple[list[str], list[str], dict]:
    """(mixes, losses, {(mix, loss): best ConfigSummary over similarities})."""
    mixes = list(dict.fromkeys(s.mix for s in ranking))
    losses = list(dict.fromkeys(s.loss for s in ranking))
    best: dict[tuple[str, str], ConfigSummary] = {}
    for summary in ranking:
        key = (summary.mix, summary.loss)
        if key not in best or summary.headline > best[key].headline:
            best[key] = summary
    return mixes, losses, best


# ---------------------------------------------------------------------------------------------
# report (pure rendering)


def _pm(value: tuple[float, float]) -> str:
    return f"{value[0]:.4f} ± {value[1]:.4f}"


def render_markdown(
    ranking: Sequence[ConfigSummary],
    *,
    setup: Mapping[str, Any],
    references: Mapping[str, Mapping[str, float]],
    dropped: Sequence[Dropped],
    failed: Mapping[str, str],
    command: str,
    plots: Mapping[str, str],
    best_config: str | None,
) -> str:
    """The study report. ``plots`` maps a title to a file name (relative link)."""
    lines = [f"# Negatives study: {setup.get('title', 'study')}", ""]
    facts = [[key, str(value)] for key, value in setup.items() if key != "title"]
    lines += _table(["", ""], facts) + [""]
    if ranking:
        best = ranking[0]
        lines += [
            f"**Best: {best.label}** — Recall@50 {_pm(best.metrics[HEADLINE])} over seeds "
            f"{', '.join(map(str, best.seeds))}"
            + (f"; written as a run config to `{best_config}`." if best_config else "."),
            "",
        ]
    if references:
        lines += ["Reference lines (same eval split, full catalog, train items excluded):", ""]
        rows = [
            [name, _number(m.get("recall@50")), _number(m.get("recall@10")),
             _number(m.get("ndcg@10"))]
            for name, m in references.items()
        ]  # fmt: skip
        lines += _table(["reference", "Recall@50", "Recall@10", "NDCG@10"], rows) + [""]

    lines += ["## Ranked configurations", "", "Mean ± std over seeds; train seconds per cell.", ""]
    rows = []
    for rank, s in enumerate(ranking, start=1):
        note = f" ({s.diverged_seeds} diverged)" if s.diverged_seeds else ""
        rows.append(
            [str(rank), mix_label(s.mix), s.loss, s.family, s.similarity,
             f"**{_pm(s.metrics[HEADLINE])}**" if rank == 1 else _pm(s.metrics[HEADLINE]),
             _pm(s.metrics["recall@10"]), _pm(s.metrics["ndcg@10"]),
             f"{s.train_seconds[0]:.1f} ± {s.train_seconds[1]:.1f}",
             f"{s.fill_share:.1%}" + note]
        )  # fmt: skip
    lines += _table(
        ["#", "negatives", "loss", "family", "similarity", "Recall@50", "Recall@10", "NDCG@10",
         "train s", "fills"],
        rows,
    ) + [""]  # fmt: skip

    if ranking:
        mixes, losses, best_of = pivot(ranking)
        lines += [
            "## Negatives × loss",
            "",
            "Mean Recall@50 of the best similarity for each (negatives, loss); – = not run.",
            "",
        ]
        rows = []
        for mix in mixes:
            row = [mix_label(mix)]
            for loss in losses:
                s = best_of.get((mix, loss))
                row.append("–" if s is None else f"{s.headline:.4f} ({s.similarity})")
            rows.append(row)
        lines += _table(["negatives", *losses], rows) + [""]

        lines += ["## Per axis", ""]
        for axis in AXES:
            lines += [f"### {axis}", ""]
            rows = [
                [mix_label(r["value"]) if axis == "negatives" else r["value"],
                 str(r["configurations"]), f"{r['mean']:.4f}",
                 f"{r['best']:.4f} ± {r['best_std']:.4f}", r["best_label"]]
                for r in axis_summary(ranking, axis)
            ]  # fmt: skip
            lines += _table(
                [axis, "configurations", "mean Recall@50", "best Recall@50", "best configuration"],
                rows,
            ) + [""]  # fmt: skip

    for title, file_name in plots.items():
        lines += [f"![{title}]({file_name})", ""]

    if dropped:
        lines += ["## Combinations not run", ""]
        # reason -> (mix, loss) -> similarities, so each line stays short.
        by_reason: dict[str, dict[tuple[str, str], list[str]]] = {}
        for d in dropped:
            by_reason.setdefault(d.reason, {}).setdefault((d.mix, d.loss), []).append(d.similarity)
        rows = [
            [reason, ", ".join(f"{mix_label(mix)} · {loss} · {'/'.join(similarities)}"
                               for (mix, loss), similarities in combos.items())]
            for reason, combos in by_reason.items()
        ]  # fmt: skip
        lines += _table(["reason", "combinations"], rows) + [""]
    if failed:
        lines += ["## Failed cells (a rerun retries them)", ""]
        lines += _table(["cell", "error"], [[k, v.splitlines()[0]] for k, v in failed.items()])
        lines += [""]
    lines += [
        "## Abbreviations",
        "",
        "enc = exposed_not_clicked, ro = ranked_out, unx = unexposed (data negatives, split "
        "evenly when combined); in_batch = the other rows' positives; mixed = in-batch + "
        "catalog samples, each with logQ correction. fills = share of data negatives filled "
        "from unexposed because a row had too few of a source.",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots

_FAMILY_COLORS = {"pointwise": "#4c72b0", "pairwise": "#dd8452", "listwise": "#55a868"}
_REFERENCE_STYLES = {"oracle": ("#c44e52", "--"), "popularity": ("#8c8c8c", ":")}


def _bar_axes(
    axes, ranking: Sequence[ConfigSummary], values, errors, *, xlabel: str, invert: bool
) -> None:
    positions = list(range(len(ranking)))
    axes.barh(
        positions,
        values,
        xerr=errors,
        color=[_FAMILY_COLORS[s.family] for s in ranking],
        capsize=2,
        error_kw={"elinewidth": 0.8},
    )
    axes.set_yticks(positions, [s.label for s in ranking], fontsize="small")
    if invert:
        # Best first, at the top. Axes that share y are inverted once, by the first of them.
        axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", alpha=0.3)


def _figure_height(ranking: Sequence[ConfigSummary]) -> float:
    return 1.2 + 0.22 * max(1, len(ranking))


def _draw_recall(axes, ranking, references) -> None:
    from matplotlib.patches import Patch

    _bar_axes(
        axes,
        ranking,
        [s.metrics[HEADLINE][0] for s in ranking],
        [s.metrics[HEADLINE][1] for s in ranking],
        xlabel="Recall@50 (mean ± std over seeds)",
        invert=True,
    )
    handles = [Patch(color=color, label=family) for family, color in _FAMILY_COLORS.items()]
    for name, metrics in references.items():
        if HEADLINE in metrics:
            color, style = _REFERENCE_STYLES.get(name, ("#000000", "-."))
            handles.append(
                axes.axvline(metrics[HEADLINE], color=color, linestyle=style, label=name)
            )
    axes.legend(handles=handles, loc="lower right", fontsize="small")
    axes.set_title("Recall@50 per configuration")


def _draw_cost(axes, ranking, *, invert: bool = True) -> None:
    _bar_axes(
        axes,
        ranking,
        [s.train_seconds[0] for s in ranking],
        [s.train_seconds[1] for s in ranking],
        xlabel="train seconds per cell (one CPU)",
        invert=invert,
    )
    axes.set_title("training cost")


def plot_recall(
    ranking: Sequence[ConfigSummary], references: Mapping[str, Mapping[str, float]]
) -> bytes:
    """PNG: Recall@50 per configuration (ranked), error bars over seeds, reference lines."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, _figure_height(ranking)))
    _draw_recall(figure.add_subplot(), ranking, references)
    return _png_bytes(figure)


def plot_cost(ranking: Sequence[ConfigSummary]) -> bytes:
    """PNG: train seconds per configuration, in the ranking's order."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, _figure_height(ranking)))
    _draw_cost(figure.add_subplot(), ranking)
    return _png_bytes(figure)


def plot_both(
    ranking: Sequence[ConfigSummary], references: Mapping[str, Mapping[str, float]]
) -> bytes:
    """PNG: the two plots side by side, sharing the configuration axis."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, _figure_height(ranking)))
    recall_axes, cost_axes = figure.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    _draw_recall(recall_axes, ranking, references)
    _draw_cost(cost_axes, ranking, invert=False)
    cost_axes.tick_params(axis="y", labelleft=False)
    return _png_bytes(figure)


def write_bytes(path: str, data: bytes) -> None:
    _write_bytes(path, data)
