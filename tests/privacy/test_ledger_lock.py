"""Two runs at one site train at the same moment: the ledger is held from reading the
balance to charging it, so neither charge is lost (issue 23)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path

from fedfuse.config import load_config
from fedfuse.data.sites import plan_federation, simulated_site
from fedfuse.site.app import build_client_app
from tests.helpers import ROOT
from tests.site.test_private_training import REQUEST, site_context, train_message


def one_round(state: str, server_round: int, start: mp.synchronize.Barrier) -> None:
    """A process of its own training one private round at the site in ``state``."""
    from fedfuse.compat import task_identity

    cfg = load_config(ROOT / "simulations" / "digits.toml")
    site = dataclasses.replace(simulated_site(cfg, 10), state_dir=Path(state))
    schema = plan_federation(cfg).dataset.schema
    msg = train_message(site, schema, REQUEST, server_round)
    app = build_client_app(lambda ctx: site)
    start.wait()  # both processes reach the ledger together
    with task_identity():
        app(msg, site_context())


def test_two_rounds_at_once_are_both_charged(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=one_round, args=(str(tmp_path), r, start)) for r in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    site = simulated_site(load_config(ROOT / "simulations" / "digits.toml"), 10)
    per_round = -(-len(site.train) // 32)  # ceil(n / B) steps a round at this site
    # both rounds are on the books (without the lock both read an empty ledger, and
    # the later save kept one round's steps)
    assert sum(int(t) for _, _, t in ledger["history"]) == 2 * per_round, ledger
