"""Evaluation: frame- and video-level detection metrics, threshold fitting, result tables and plots.

Conventions shared by every module here: fake is the positive class (label 1), a score is P(fake) in [0, 1], and a
frame (or video) is called fake when ``score >= threshold``. Submodules are imported explicitly
(``from r2m_lab.evaluation.metrics import frame_metrics``) so that importing this package stays cheap; only
``plots`` pulls in matplotlib.
"""
