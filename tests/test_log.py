"""gcl.log: a failure is recorded in the run's train.log (traceback on rank 0, one line on every rank), and a
resumed run's metrics.jsonl keeps one row per step."""
from __future__ import annotations

import io
import json
import logging

import pytest

from gcl.log import cut_metrics, report_failure


@pytest.fixture
def handlers(tmp_path):
    """The root logger as Hydra sets it up: a console stream and the run's train.log file."""
    root = logging.getLogger()
    console, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "train.log")
    for h in (console, file):
        root.addHandler(h)
    try:
        yield console.stream, tmp_path / "train.log"
    finally:
        for h in (console, file):
            root.removeHandler(h)
            h.close()


def _fail():
    def deep():
        raise OSError(28, "No space left on device")

    try:
        deep()
    except OSError as e:
        return e


def test_failure_traceback_goes_to_train_log_and_one_line_to_the_console(handlers):
    console, train_log = handlers
    report_failure(_fail(), rank=0)
    text = train_log.read_text()
    assert "rank 0 failed: OSError: [Errno 28] No space left on device" in text
    assert "Traceback" in text and "in deep" in text
    assert console.getvalue().strip() == "rank 0 failed: OSError: [Errno 28] No space left on device"


def test_other_ranks_append_their_line_to_rank0s_train_log(tmp_path):
    shared = tmp_path / "rank0" / "train.log"
    shared.parent.mkdir()
    shared.write_text("[..][gcl.train][INFO] - step 5\n")
    report_failure(_fail(), rank=3, shared_log=shared)
    lines = shared.read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith("rank 3 failed: OSError: [Errno 28] No space left on device")


def test_plain_errors_keep_their_whole_message_without_a_traceback(handlers):
    class ConfigError(ValueError):
        pass

    _, train_log = handlers
    report_failure(ConfigError("trainer.resume: refused\n  data.batch_size 8 -> 4"), rank=0, plain=(ConfigError,))
    text = train_log.read_text()
    assert "data.batch_size 8 -> 4" in text and "Traceback" not in text


def test_cut_metrics_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/x": 1}, *({"step": s, "loss": s} for s in (1, 2, 3, 4))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # torn by a SIGKILL
    assert cut_metrics(path, 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert cut_metrics(path, 0) == 3 and path.read_text() == ""  # a restart from step 0 logs everything again
