"""Tracking helpers: secret redaction and the sqlite retry. No MLflow server, no model."""

from __future__ import annotations

import pytest

from harness.core import tracking as T


def test_redact_url_passwords_and_token_shapes(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "not-shaped-but-secret")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish-value")  # not a secret despite the name
    text = ("store postgresql://bob:hunter2@db:5432/mlflow token hf_" + "a" * 34 + " key sk-" + "b" * 40 +
            " env not-shaped-but-secret tok false-ish-value")
    out = T.redact(text)
    assert "hunter2" not in out and "postgresql://bob:***@db:5432/mlflow" in out
    assert "hf_aaaa" not in out and "sk-bbbb" not in out
    assert "not-shaped-but-secret" not in out
    assert "false-ish-value" in out


def test_redact_mapping_hides_secret_keys():
    out = T.redact_mapping({"hub_token": "abc", "lora.rank": 4, "uri": "https://u:p4ss@h/x",
                            "eval.probe_tokens": 32, "openai_api_key": "k"})
    assert out == {"hub_token": "***", "lora.rank": 4, "uri": "https://u:***@h/x", "eval.probe_tokens": 32,
                   "openai_api_key": "***"}


def test_retry_retries_lock_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert T.retry(flaky, "x") == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        T.retry(lambda: (_ for _ in ()).throw(ValueError("bad")), "x")


def test_null_tracker_has_the_same_methods():
    public = {n for n in dir(T.MlflowTracker) if not n.startswith("_")} - {"run_id"}
    null = T.NullTracker()
    for name in public:
        assert callable(getattr(null, name)), name
    null.log_metrics({"a": 1.0}, step=1)  # does nothing, raises nothing
