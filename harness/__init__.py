"""harness: run grids of post-training recipes (SFT, LoRA-SFT, partial FT, DPO over LoRA), track them in
MLflow, and compare how far each moved the model's preferences and at what cost.

    python -m harness --help
"""

__version__ = "0.1.0"
