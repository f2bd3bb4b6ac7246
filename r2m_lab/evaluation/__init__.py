"""Evaluation: frame- and video-level detection metrics, threshold fitting, scoring, the run report and its writers,
the output ensemble, result tables and plots.

- ``metrics``: AUC, AP, EER, accuracies, TPR at FPR, video aggregation, thresholds.
- ``scoring``: :class:`~r2m_lab.evaluation.scoring.UniqueFrameScorer`, every distinct frame of several sets scored
  once per model and mapped back to each set.
- ``ensemble``: the output ensemble (a reference row, not a merge): mean | median | max of the members' P(fake).
- ``report``: :class:`~r2m_lab.evaluation.report.RunReport`, the typed result of one evaluation run.
- ``writers``: one function per output of a report (metrics.json, score CSVs, CSV/LaTeX tables, Markdown, PNGs,
  the experiment logger); ``tables`` and ``plots`` are the renderers they use.

Conventions shared by every module here: fake is the positive class (label 1), a score is P(fake) in [0, 1], and a
frame (or video) is called fake when ``score >= threshold``. Submodules are imported explicitly
(``from r2m_lab.evaluation.metrics import frame_metrics``) so that importing this package stays cheap; only
``plots`` (and ``writers``, which uses it) pulls in matplotlib.
"""
