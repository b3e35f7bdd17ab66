"""The coordinator, the ServerApp side of a federation.

``loop.Coordinator`` is the main loop; it composes ``discovery`` (who joined),
``cohorts`` (a model and a strategy per architecture), ``rounds`` (one round in every
cohort), ``aggregation`` (plaintext or secure collectors behind one interface, the
latter running ``sessions``), ``privacy`` (the sites' privacy reports), ``grid``
(bounded exchanges), ``gates`` (checks on plaintext updates), ``checkpoint`` and
``records`` (typed round records, the result). ``app`` wraps the loop in Flower's
ServerApp for simulation; a deployment's ServerApp is ``fedfuse.deploy.apps``.
"""
