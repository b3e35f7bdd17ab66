"""From cohort models to one predictor: the soft vote's math (``soft_vote``), the result
and the choice of method (``result``), the stacking head (``stacking``), distillation
(``distill``), the coordinator's fusion rounds with the sites (``federated``) and
``fedfuse fuse``'s rebuild from a finished run (``rebuild``)."""
