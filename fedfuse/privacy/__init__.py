"""Differential privacy, state apart from math as in Opacus.

- ``accounting``: pure math (δ default, Poisson steps, ε of a history, σ for a target ε);
- ``ledger``: a site's privacy account and where it is kept;
- ``dpsgd``: Opacus's ``make_private`` around the plain training loop;
- ``budget``: the site's rule (what the coordinator may ask, the round planned against
  the site's own budget);
- ``client_level``: client-level DP math (clipping, the noisy cohort mean), used by
  ``fedfuse.strategies.ClientLevelDP``.
"""
