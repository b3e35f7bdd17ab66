"""The architectures (``registry``), their plain training and evaluation loops
(``training``) and where tensors live (``device``)."""
