"""Reads logged results (MLflow runs and their artifacts) and writes comparisons and reports."""
