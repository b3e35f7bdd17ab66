"""What a run leaves behind: the verifiable artifact format (``manifest``) and its
predictor (``predictor``), the run's fused model (``fused``), its figures (``summary``),
the run directory (``rundir``) and progress display (``progress``), and the artifact's
export (``export``) and evaluation (``evaluation``)."""
