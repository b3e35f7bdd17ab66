"""What the sites hold: data sets (``datasets``), how one is split into a coordinator
test set and per-site train/validation splits (``partition``), a site's local view
(``sites``), and the federated feature statistics (``stats``)."""
