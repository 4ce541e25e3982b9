"""From stored results to the Answer: statistics over seed pairs (:mod:`~robustse.analysis.stats`),
verdict tables (:mod:`~robustse.analysis.inference`), ratio measurements
(:mod:`~robustse.analysis.ratios`), the Answer (:mod:`~robustse.analysis.answer`), figures
(:mod:`~robustse.analysis.plots`) and the report (:mod:`~robustse.analysis.report`, in four stages:
:mod:`~robustse.analysis.rundata`, :mod:`~robustse.analysis.analyse`,
:mod:`~robustse.analysis.figures`, :mod:`~robustse.analysis.render`). Imports no
torch: only :mod:`robustse.core`'s torch-free modules, and the model registry lazily for runs
without a model table."""
