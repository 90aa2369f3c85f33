"""Evaluation: the ranking kernel (CMC, mAP, mINP), distances, k-reciprocal re-ranking, the evaluator that
gathers features over processes, the test protocols (query + gallery loaders, view/time modes), the
result reports with their per-query results and breakdowns, run comparisons (``comparison``), relevance
maps (``relevance``) and the pictures (ranked lists, embeddings, report.html). Running a model over a
test set is the engine's job (``processor.inference``).
"""
from evaluation.distance import compute_distance
from evaluation.evaluator import ReIDEvaluator
from evaluation.ranking import NoValidQueryError, evaluate_rank, removal_mask
from evaluation.report import format_table, read_results, write_results
from evaluation.reranking import re_ranking

__all__ = ["NoValidQueryError", "ReIDEvaluator", "compute_distance", "evaluate_rank", "format_table", "re_ranking",
           "read_results", "removal_mask", "write_results"]
