"""From stored results to the Answer: statistics over seed pairs (:mod:`~robustse.analysis.stats`),
verdict tables (:mod:`~robustse.analysis.inference`), ratio measurements
(:mod:`~robustse.analysis.ratios`), the Answer (:mod:`~robustse.analysis.answer`), figures
(:mod:`~robustse.analysis.plots`) and the report (:mod:`~robustse.analysis.report`). Imports no
torch: only :mod:`robustse.core`'s torch-free modules, and the model registry lazily for runs
without a model table."""
