"""The foundation every other layer stands on: the variant schema (`schema`), the method registry
(`methods`), variants and their ids (`variant`), tracking and redaction (`tracking`), run queries and tag
names (`runs`), the metric catalogue (`metrics`) and provenance tags (`provenance`).

Nothing here imports torch, the training code (`experiments`), the analysis (`analysis`) or the
orchestration around it (the rest of `harness`): arrows only point down to here
(`tests/test_architecture.py` keeps it so).
"""
