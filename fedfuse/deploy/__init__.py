"""Across organisations: the coordinator (a Flower SuperLink with TLS and node
authentication, ``coordinator`` and ``superlink``), the partner sites (a SuperNode each,
``site``), the apps a deployed run loads (``apps``), key material (``certs``, ``pki``)
and Flower's daemons as child processes (``process``). See docs/deployment.md."""
