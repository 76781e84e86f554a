"""Quality next to cost: train every token-reduction variant of a sweep, then compare them.

``python -m pipeline.compare run SWEEP`` trains and evaluates (``runner``), ``report SWEEP_DIR``
gathers the table, JSON, CSV and plots (``report``, ``plots``). A sweep is a YAML file
(``sweep``); budgets can be matched by measurement (``match``); costs are measured on each
run's own configuration (``cost``).
"""
