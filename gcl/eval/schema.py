"""Typed schema of the ``eval`` config node (shared by ``train.py`` in-loop eval and ``evaluate.py``).

Plain dataclasses, OmegaConf structured-config compatible: ``gcl.config`` uses ``EvalConfig`` as the typed
``eval`` node, and the presets in ``conf/eval/*.yaml`` fill it. Per-task defaults live here (a YAML list
item cannot inherit defaults); a preset states only what differs.

A task is: a document set (webdataset shards, the synthetic catalog split, or a Parquet/CSV table with image
bytes or paths), a query side and a document side (``{fields, weights}``, fused like the loss does:
``normalize(sum_k a_k normalize(f_k))``, missing fields dropped and weights renormalised), a relevance rule,
how many queries to sample (seeded) and the metrics to report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

TASK_KINDS = ("retrieval", "zeroshot")
RELEVANCE_RULES = ("item_id", "field", "graded", "fixed")
GRADE_SCALES = ("none", "gcl", "reciprocal")
QUERY_SAMPLING = ("uniform", "marqo", "all")
QUERY_WEIGHTING = ("none", "grade")
QUERY_WHITESPACE = ("strip", "collapse", "none")
DUPLICATE_GRADE = ("max", "min")
CAP_ORDER = ("stable", "marqo")
MISSING_DOCS = ("drop", "keep")
MULTI_IMAGE = ("first", "max", "min")
SCORE_PRECISION = ("fp32", "fp16", "fp16_inputs")


@dataclass
class EvalSideConfig:
    """One side of a task: the fields fused into one vector, with their weights (empty = equal)."""

    fields: list[str] = MISSING
    weights: list[float] = field(default_factory=list)


@dataclass
class RelevanceConfig:
    """Which documents are relevant to a query.

    - ``item_id``: the documents with the query's ``item_id`` (text-to-image: a product's own picture).
    - ``field``: every document whose ``field`` value equals the query's (e.g. every product whose category
      is "dresses"); ``field`` defaults to the query side's single field.
    - ``graded``: (query, document) rows of the table give the grade in ``grade_field``; ``grade_scale``
      maps it to an integer qrel: ``none`` (rounded), ``gcl`` (min-max rescaled to 1..100 per split, as GCL's
      evaluation does), ``reciprocal`` (a 1-based position p -> round(100 / p)).
    - ``fixed``: a fixed list of queries with their judgements from ``qrels_file``: a JSON ``{query text:
      {doc id: grade}}`` (Marqo-FashionCLIP's ``gt_query_doc`` files, GCL's ``gt_results.json``), or TREC
      qrels (``qid 0 docid grade``) with the texts in ``queries_file`` (``qid<TAB>text``, what every evaluation
      writes under ``runs/``).

    Edge rules (defaults: ours; the Marqo presets set Marqo's, see docs/eval-protocols.md):
    ``max_relevant`` keeps at most that many judged rows per query (0 = all; Marqo: 1000), the first ones by
    grade descending - ties in table order (``cap_order: stable``) or in the order pandas' default
    (quicksort) ``sort_values`` leaves them (``marqo``); ``duplicate_grade`` is the grade kept when a (query,
    document) pair is judged twice; ``missing_docs`` says whether a judged document absent from the corpus is
    dropped (counted) or kept as relevant-but-unretrievable (Marqo; pytrec_eval then counts it).
    """

    rule: str = "item_id"
    field: str | None = None
    grade_field: str | None = None
    grade_scale: str = "none"
    min_grade: float = 1.0  # graded: qrels below this (after scaling) are not relevant
    qrels_file: str | None = None  # fixed: JSON or TREC qrels, absolute or under eval.data_root
    queries_file: str | None = None  # fixed, TREC qrels: qid<TAB>text
    qrels_source: str | None = None  # where qrels_file comes from (named in the "missing file" message)
    max_relevant: int = 0  # judged rows kept per query (0 = all)
    cap_order: str = "stable"  # stable | marqo
    duplicate_grade: str = "max"  # max | min
    missing_docs: str = "drop"  # drop | keep


@dataclass
class TaskConfig:
    """One evaluation task; see the module docstring. Columns map gcl field names -> table column names."""

    name: str = MISSING
    kind: str = "retrieval"  # retrieval | zeroshot
    # --- document source (exactly one of split / shards / table) ---
    split: str | None = None  # a split of the data config's catalog (synthetic: val | test | test_heldout)
    shards: str | None = None  # webdataset URL pattern (brace expansion), absolute or under data_root
    table: str | None = None  # Parquet/CSV file, glob or folder, absolute or under eval.data_root
    corpus: str | None = None  # graded tasks: a separate corpus table/JSON of documents (GS-10M layout)
    columns: dict[str, str] = field(default_factory=dict)  # field -> column; unmapped fields use their name
    image_column: str | None = None  # column with image bytes / {"bytes": ...} structs / paths
    image_root: str | None = None  # base folder for relative image paths (default: the table's folder)
    doc_id_column: str | None = None  # graded tasks: the document id column shared by queries and corpus
    query_id_column: str | None = None  # graded tasks: a query id column (default: the query text)
    max_docs: int = 0  # keep only the first N documents read (0 = all); a quick smoke-test knob
    hf_dataset: str | None = None  # where the table comes from (named in the "missing data" error message)
    # --- what is compared ---
    query: EvalSideConfig = field(default_factory=EvalSideConfig)
    doc: EvalSideConfig = field(default_factory=lambda: EvalSideConfig(fields=["image"]))
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    num_queries: int = 0  # seeded sample of queries (0 = all)
    unique_queries: bool = False  # queries are the unique values of the query field(s) (category-to-product)
    # uniform: numpy Generator seeded by (eval.seed, task name); marqo: numpy RandomState(eval.seed).choice over
    # Marqo's sorted query keys (pandas DataFrame.sample, as GCL's evals do); all: every query.
    query_sampling: str = "uniform"
    query_weighting: str = "none"  # none | grade: draw probability proportional to the query's summed grade
    query_whitespace: str = "strip"  # strip | collapse (and runs of whitespace -> one space) | none (as stored)
    query_template: str = "{}"  # the text embedded for a query; "{}" <- the query, e.g. "a photo of {}"
    multi_image: str = "first"  # several rows (images) of one item: first row only | max | min over its rows
    k: int = 100  # retrieval depth for the run (metrics at cut-offs above k are truncated at k)
    metrics: list[str] = field(default_factory=lambda: ["recall@1", "recall@10", "mrr@1000", "ndcg@10"])
    # --- zero-shot classification ---
    labels_field: str | None = None  # the field holding each document's class label
    labels: list[str] = field(default_factory=list)  # class names (empty = the unique labels in the data)
    prompt_templates: list[str] = field(default_factory=lambda: ["a photo of {}"])  # "{}" <- label


@dataclass
class AggregateConfig:
    """An unweighted mean of ``metrics`` over the tasks whose names match one of ``tasks`` (fnmatch)."""

    name: str = MISSING
    tasks: list[str] = MISSING
    metrics: list[str] = field(default_factory=list)  # empty = every metric the matched tasks share


@dataclass
class GalleryConfig:
    """The retrieval gallery PNG: ``num_queries`` queries of ``task`` with their top-``k`` images."""

    enabled: bool = True
    task: str | None = None  # default: the first retrieval task with image documents
    num_queries: int = 6
    k: int = 5
    thumb_size: int = 96


@dataclass
class EvalConfig:
    """The ``eval`` node: a named suite of tasks plus runner settings."""

    name: str = "eval"  # metric prefix: <name>/<task>/<metric>
    tasks: list[TaskConfig] = field(default_factory=list)
    aggregates: list[AggregateConfig] = field(default_factory=list)
    data_root: str | None = None  # local copy of the HF files the marqo presets read
    # Free strings a preset interpolates into its task paths, e.g. ${...params.gs_subset} from a task field.
    params: dict[str, str] = field(default_factory=dict)
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    chunk_size: int = 8192  # documents scored per matmul block (exact top-k, fp32)
    # Token budget of every text field in this suite: null = the data config's per-field budgets (training's),
    # 0 = the model's own context length, N = N tokens (capped at the model's). Marqo's evals use one budget.
    context_length: int | None = None
    # fp32 (exact) | fp16: vectors and scores rounded to fp16 (a half-precision GEMM, ties) | fp16_inputs:
    # vectors rounded to fp16, fp32 scores. Ties are broken by document id (trec_eval) in every mode.
    score_precision: str = "fp32"
    write_runs: bool = True  # TREC run + qrels + queries files per retrieval task under <out>/runs/
    cache_dir: str | None = None  # embedding cache for standalone evaluation (null = no cache)
    sharded: bool = False  # in-loop: embed documents sharded across ranks + all_gather (else rank 0 only)
    # Extra per-task metrics, each the mean of listed ones, e.g. {avg_recall: [recall@1, recall@10]}
    # (Marqo's leaderboard columns AvgRecall / AvgP); computed where all parts exist.
    means: dict[str, list[str]] = field(default_factory=dict)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    # Metric names shown side by side at the end of a training run: the run's first evaluation (step 0: the
    # starting model) against its last, so a fine-tune's domain gain and its retention read in one table.
    summary: list[str] = field(default_factory=list)
