"""A site's record-level DP-SGD round: the real ClientApp, called as a SuperNode would
call it (its ledger, its budget rule, its secret noise)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from opacus.accountants import RDPAccountant

from fedfuse.config import load_config
from fedfuse.data.sites import Site, plan_federation, simulated_site
from fedfuse.models.registry import build_model
from fedfuse.privacy.budget import PrivacyRequest
from fedfuse.site.app import build_client_app
from tests.helpers import ROOT, incoming


@pytest.fixture(scope="module")
def digits_site() -> tuple[Site, object]:
    cfg = load_config(ROOT / "simulations" / "digits.toml")
    return simulated_site(cfg, 10), plan_federation(cfg).dataset.schema


def train_message(site: Site, schema, request: PrivacyRequest | None, server_round: int = 1,
                  seed: int = 11):
    model = build_model(site.arch, schema, seed=0)
    config = {"lr": 0.5, "local-epochs": 1, "batch-size": 32, "momentum": 0.0,
              "weight-decay": 0.0, "seed": seed, "server-round": server_round}
    if request is not None:
        config.update(request.to_config())
    return incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                "config": ConfigRecord(config)}))


def site_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


REQUEST = PrivacyRequest(mode="sample", accountant="rdp", max_grad_norm=1.0, planned_rounds=3,
                         target_epsilon=4.0, budget=4.0)


def test_ledger_survives_a_site_restart_and_stops_at_the_budget(tmp_path, digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path)
    app = build_client_app(lambda ctx: site)
    spent = []
    for server_round in range(1, 5):
        # A fresh Context each time: the site process restarted between rounds.
        reply = app(train_message(site, schema, REQUEST, server_round), site_context())
        report = reply.content["privacy"]
        spent.append(report["epsilon"])
        if server_round <= 3:
            assert report["status"] == "trained" and "arrays" in reply.content
        else:
            assert report["status"] == "budget-exhausted" and "arrays" not in reply.content
    assert spent[0] < spent[1] < spent[2] <= 4.0 and spent[3] == spent[2]
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert ledger["refused_rounds"] == [4]
    reference = RDPAccountant()
    reference.history = [tuple(h) for h in ledger["history"]]
    assert spent[2] == pytest.approx(reference.get_epsilon(ledger["delta"]), rel=0.01)


def test_a_later_request_cannot_raise_the_sites_budget(tmp_path, digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path)
    app = build_client_app(lambda ctx: site)
    app(train_message(site, schema, REQUEST, 1), site_context())
    generous = PrivacyRequest(**{**REQUEST.__dict__, "budget": 100.0})
    reply = app(train_message(site, schema, generous, 2), site_context())
    assert reply.content["privacy"]["budget"] == 4.0


def test_dp_noise_comes_from_the_site_secret_not_the_coordinators_seed(digits_site):
    site, schema = digits_site
    twin = dataclasses.replace(site, secret=b"x" * 32)

    def update(s: Site) -> dict[str, torch.Tensor]:
        reply = build_client_app(lambda ctx: s)(train_message(s, schema, REQUEST),
                                                site_context())
        return reply.content["arrays"].to_torch_state_dict()

    a, again, b = update(site), update(site), update(twin)
    assert all(torch.equal(a[k], again[k]) for k in a)  # reproducible for the site itself
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff > 1e-3  # same data, same round seed, different secret: different noise


def test_plain_round_carries_no_privacy_record(digits_site):
    site, schema = digits_site
    reply = build_client_app(lambda ctx: site)(train_message(site, schema, None),
                                               site_context())
    assert "privacy" not in reply.content and "arrays" in reply.content


def test_a_coordinator_cannot_cancel_a_deployed_sites_noise_by_repeating_its_seed(
        digits_site):
    """Two train requests with the same seed and slightly different weights: subtracting
    the two updates cancels the DP noise if the noise follows the seed (the simulated
    site, noise = "seed"), and leaves it if it follows the whole request (a deployed
    site, the default): issue 23, item 1."""
    site, schema = digits_site
    assert site.noise == "seed"  # simulation: one party plays every site

    def update_difference(s: Site) -> float:
        app = build_client_app(lambda ctx: s)
        first = train_message(s, schema, REQUEST)
        second = train_message(s, schema, REQUEST)
        nudged = {k: v + 1e-4 for k, v in second.content["arrays"].to_torch_state_dict().items()}
        second.content["arrays"] = ArrayRecord(nudged)
        updates = []
        for msg in (first, second):
            sent = msg.content["arrays"].to_torch_state_dict()
            got = app(msg, site_context()).content["arrays"].to_torch_state_dict()
            updates.append({k: got[k] - sent[k] for k in got})
        return max(float((updates[0][k] - updates[1][k]).abs().max()) for k in updates[0])

    cancelled = update_difference(site)
    deployed = update_difference(dataclasses.replace(site, noise="request"))
    assert cancelled < 1e-3  # the noise subtracted out: the updates nearly coincide
    assert deployed > 30 * cancelled and deployed > 1e-2  # fresh noise for the new request


def test_a_deployed_site_repeats_its_noise_for_the_very_same_request(digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, noise="request")
    app = build_client_app(lambda ctx: site)
    a, b = (app(train_message(site, schema, REQUEST), site_context())
            .content["arrays"].to_torch_state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact replay and resume
