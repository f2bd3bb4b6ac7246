"""The paper's tables from run folders: discovery, expected jobs, statistics, rendering (``stage=tables``).

==============  ===================================================================================================
``runs``        discover run and sweep folders, load and validate ``metrics.json``, expected vs present jobs,
                relaunch commands
``grouping``    runs into tables by (stage, distinguishing overrides), pooled over seeds; mixed benchmark / θ₀ refused
``scores``      the score CSVs of a table, aligned on one video order per test set
``stats``       weighted (bootstrap) AUC vectorised over replicates, paired two-level draws, percentile intervals
``tables``      cells (mean ± std or missing), best marks, merger − reference pairs
``render``      Markdown, LaTeX and CSV
``plots``       heatmaps, scaling and expansion curves
``build``       :func:`~r2m_lab.results.build.build_tables`: all of the above, written to a run folder
==============  ===================================================================================================
"""
