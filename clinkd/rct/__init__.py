"""Reflective Correction Training with Semantic-Aware Selective Generation (docs/method.md).

Reading order: ``settings`` (the stage's options), ``similarity`` (the semantic scorer), ``scoring``
(is an answer wrong, which candidate is best), ``round`` (one correction round, resumable),
``summary`` (what a round did). The stage itself — rounds of correction and SFT — is
``clinkd.train.rct_stage``; ``clinkd rct-report`` prints the summaries of a run.
"""
