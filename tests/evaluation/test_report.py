"""Reports: both perplexity file shapes are read, and the written files hold the figures they were given."""

import json

import pytest

from hf_compress_prompt.errors import UserInputError
from hf_compress_prompt.evaluation.report import read_perplexities, write_report
from hf_compress_prompt.evaluation.tasks import TaskReport, TaskResult


def _report():
    def r(task, score):
        return TaskResult(task, {"accuracy": score}, "accuracy", 10, 1.0)

    return TaskReport({"dense": {"factoid_qa": r("factoid_qa", 0.40)}, "sparse": {"factoid_qa": r("factoid_qa", 0.20)},
                       "sparse+prompt": {"factoid_qa": r("factoid_qa", 0.39)}}, "dense", 0.05)


def test_the_recovery_bench_shape_is_read(tmp_path):
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps({"benchmark": "recovery", "results": [
        {"setting": "a", "compressed": {"wikitext2": 49.5}, "recovered": {"wikitext2": 47.6}, "other": 1},
        {"dense": {"wikitext2": 19.2}, "transfer": None}]}))
    assert read_perplexities(path) == {"dense": {"wikitext2": 19.2}, "settings": {
        "a": {"compressed": {"wikitext2": 49.5}, "recovered": {"wikitext2": 47.6}}}}
    path.write_text(json.dumps({"results": []}))
    with pytest.raises(UserInputError, match="no perplexities in a known shape"):
        read_perplexities(path)


def test_report_tables_say_which_models_hold(tmp_path):
    written = write_report(tmp_path, tasks=_report())
    md = written["markdown"].read_text()
    assert "| factoid_qa (accuracy, n=10) | 40.0 | 20.0 drops | 39.0 holds |" in md
    assert "<td>20.0 drops</td>" in written["html"].read_text()
    assert written["tasks_png"].read_bytes()[:4] == b"\x89PNG"
