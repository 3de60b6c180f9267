"""Run tooling: finished runs read back (records), compared as tables, plots and a verdict (compare), a W&B Report.

This package's ``__init__`` imports nothing; ``dsf-compare`` is :func:`dsf_lightning.runs.records.compare.main`.
"""
