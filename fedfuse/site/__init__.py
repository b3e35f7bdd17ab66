"""A site, the ClientApp side of a federation: the Flower handlers (``app``), the three
training paths (``training``), the models a message names (``members``), the replies
(``replies``) and the store that answers a repeated request (``replay``)."""
