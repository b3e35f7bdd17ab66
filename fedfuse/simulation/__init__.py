"""Both sides of a federation on one machine: ``fedfuse simulate`` (``runner``) on
Flower's simulation engine, tuned for the federation's size (``engine``)."""
