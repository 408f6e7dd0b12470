"""Top-k items for a user from a published embedding dir (Contract 4): the consumer side.

Reads users/ and items/ Parquet, checks them against manifest.json, builds an exact FAISS index
with the manifest's metric (IndexFlatIP for dot and cosine, IndexFlatL2 for euclidean) keeping
the original item ids, and prints the top items with their scores (higher = closer, on the
similarity's own scale). Needs faiss-cpu (pip install 'twotower[retrieve]').
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from pipelines.retrieval import ItemIndex, load_embeddings, parse_id


@dataclass(frozen=True)
class RetrieveResult:
    similarity: str
    index: str
    num_items: int
    k: int
    # user id -> [(item id, score)], best first
    top_items: dict[Any, list[tuple[Any, float]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help="published embedding dir (Contract 4)")
    parser.add_argument(
        "--user-id",
        dest="user_ids",
        action="append",
        required=True,
        metavar="ID",
        help="user to retrieve for, as in users/user_id (repeatable)",
    )
    parser.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(*, embeddings: str, user_ids: list[Any], k: int = 20) -> RetrieveResult:
    """Rank the whole catalog for each user with FAISS; ids may be given as text."""
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    tables = load_embeddings(embeddings)
    assert tables.users is not None and tables.items is not None
    user_ids = [parse_id(u, tables.users.ids.type) if isinstance(u, str) else u for u in user_ids]
    query_QD = tables.users.vectors_of(user_ids, what=f"users/ of {embeddings}")
    index = ItemIndex(tables.items, ann_metric=tables.ann_metric)
    found = index.search(query_QD, k)
    top_items = {
        user: list(zip(ids, scores.tolist()))
        for user, ids, scores in zip(user_ids, found.ids, found.scores_QK)
    }
    return RetrieveResult(
        similarity=tables.similarity,
        index=index.index_name,
        num_items=len(tables.items),
        k=min(k, len(tables.items)),
        top_items=top_items,
    )


def format_table(result: RetrieveResult) -> str:
    lines = []
    for user, hits in result.top_items.items():
        lines.append(
            f"user_id {user}: top {result.k} of {result.num_items} items "
            f"({result.similarity}, FAISS {result.index})"
        )
        lines.append(f"  {'rank':>4}  {'item_id':<24}{'score':>10}")
        for rank, (item, score) in enumerate(hits, start=1):
            lines.append(f"  {rank:>4}  {item!s:<24}{score:>10.4f}")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        result = run(embeddings=args.embeddings, user_ids=args.user_ids, k=args.k)
    except ImportError as error:
        print(f"twotower retrieve: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        payload = {
            "similarity": result.similarity,
            "index": result.index,
            "top_items": {
                str(user): [{"item_id": item, "score": score} for item, score in hits]
                for user, hits in result.top_items.items()
            },
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower retrieve", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
