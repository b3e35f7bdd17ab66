"""The default scenario's outcome, pinned: a change of behaviour has to update these on
purpose.

The cohort digests were taken from a run of commit 7bfb207 (before the package layout
of issue 21) and are reproduced bit for bit by the layout and by issue 22's fewer
exchanges. The metrics digest was retaken for issue 22: federated evaluation rides on
the train exchange, so the validation figures of round r are those of the model the
sites received in round r (what round r - 1's figures were before); every other figure
is unchanged. All four were retaken for issue 24, when the default scenario's accountant
became PLD (``privacy.accountant = "pld"``): the same ε = 8 with 7-8 % less noise per
site; and again when image inputs became standardised per channel (``data.standardize
= "auto"``). A change that moves the default
scenario's results (a new default, a different order of summation) must update them
and say why in its commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from tests.helpers import ROOT, run_cli

PINS = [
    ({"cnn": "ba25aef763d04a070a1ec5c5c27aca38a174577747b81cb4f28b28cf34d396a4",
      "logreg": "ae1f5a708c13d41600b2961ef0c915583e25228a17f6085b6ecf48c84ef54b70",
      "mlp": "d3bc48bc58d6ee7bb4bc9989db9514085043749032fc92914e2195d5bf4d26bd"},
     "912096e7621beaed13d8e5fc5c1a46a46472080c255c4e5cf85db55808af99ea"),
    ({"cnn": "1bf56d72b8a7f2fa446a92286abb12a949b5e65cbd30581bbf15517b436faffb",
      "logreg": "f04cb78bd42a172bd336f31b021b95680bf53167206dee4d955d8c3b50d5ecd6",
      "mlp": "140677c5c8bd8665e63f061f052cf5bf4d81f17e5ec226b6922f7fd4b86858bf"},
     "8252b17c4576e5db5b27b0d6dbecafe62b4c76a992b6c90a3a53a06cf301b39f"),
    ({"cnn": "aa2ecb82c019733307a3ea89fc1a58899542c5d7c57f288e4abe6a076f04531d",
      "logreg": "fb8962fbd4c942ae81b4dcda38d2b924704b843c8db89fda787eaf24da653338",
      "mlp": "242142adfcff6c342a7fb9b6c6e7101e612c2dc35da83e59f089a55d959490aa"},
     "947e7b1540336566a92bb5d5ad697e77055e0e216ab0115af85a7d13c315caaf"),
]
"""(cohort digests, metrics digest) of the same code on three kinds of machine: torch's
CPU kernels differ in the last bits between instruction sets, so the weights do too,
while every accuracy below is the same. The first was taken on the development machine
of sessions up to issue 24's first part (CI agreed with it); the second on an AMD EPYC
with AVX2 (``torch.backends.cpu.get_cpu_capability() == "AVX2"``), where the same
commit gave the same accuracies; the third on an AMD EPYC with AVX512 (session 27, at
commit aae2d7d: every accuracy below held, only the bits moved). A cohort digest is SHA-256 over the final model's
tensors (name, dtype, shape, bytes; by name); the metrics digest is SHA-256 of
metrics.jsonl without the wall-clock times, lines joined by newlines."""

TEST_ACCURACY = {"cnn": 0.8857938718662952, "logreg": 0.8885793871866295,
                 "mlp": 0.8495821727019499}
FUSED_TEST_ACCURACY = 0.8997214484679665


def tensors_sha256(path: Path) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}|{a.dtype}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def metrics_sha256(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_seconds", None)
        lines.append(json.dumps(record, sort_keys=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.slow
def test_the_default_scenario_reproduces_its_pinned_models_and_metrics(tmp_path: Path):
    out = tmp_path / "digits"
    done = run_cli("simulate", ROOT / "simulations" / "digits.toml", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {a: c["test_accuracy"] for a, c in summary["cohorts"].items()} == TEST_ACCURACY
    assert summary["fused"]["test_accuracy"] == FUSED_TEST_ACCURACY
    got = ({a: tensors_sha256(out / "cohorts" / f"{a}.safetensors") for a in PINS[0][0]},
           metrics_sha256(out / "metrics.jsonl"))
    assert got in PINS, (
        f"the default scenario's models or metrics moved: {got} (torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}); if only the bits moved on a new kind "
        "of machine and every accuracy above holds, add this pair to PINS, saying so")
