"""Surveillance engine: statistical methods and the monitor that applies them to the warehouse.

The statistical modules are pure functions over numpy arrays (no database, no settings), so
they can be tested against hand-worked values and reused by benchmarks:

* :mod:`pipelines.surveillance.cusum` -- Bernoulli and risk-adjusted CUSUM, many sites at once,
  with incremental continuation from a saved state.
* :mod:`pipelines.surveillance.arl` -- average run lengths (Markov chain and simulation) and
  thresholds solved from a stated false-alarm target.
* :mod:`pipelines.surveillance.funnel` -- funnel plots with exact binomial limits, overdispersion
  and Benjamini-Hochberg false-discovery control.
* :mod:`pipelines.surveillance.pchart` -- periodic exact binomial p-charts.
* :mod:`pipelines.surveillance.rare` -- sentinel rule and exact Poisson / binomial tests for
  rare events.

The methods, formulas and measured operating characteristics are in ``docs/statistics.md``.
The engine modules (profile, outcomes, engine, cli) read the warehouse and call these.
"""
