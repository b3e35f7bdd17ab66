"""Secure aggregation: the coordinator learns only the sum of a group's updates.

A SecAgg protocol (Bonawitz et al., 2017) run per cohort per round over Flower's Message
API, built on the ``cryptography`` package (X25519, HKDF-SHA256, ChaCha20-Poly1305,
ChaCha20 keystream masks) and Shamir sharing over GF(2^521 - 1). See docs/secure-aggregation.md.
"""

from fedfuse.secagg.encoding import Quantizer, UpdateSum, decode_sum, encode_update
from fedfuse.secagg.server import SecAggAbort, SecAggSession

__all__ = ["Quantizer", "SecAggAbort", "SecAggSession", "UpdateSum", "decode_sum",
           "encode_update"]
