"""A site's privacy policy, enforced by the real ClientApp on every train and
fusion-statistics message before anything is computed from its data (issue 23)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedfuse.config import load_config
from fedfuse.data.sites import Site, plan_federation, simulated_site
from fedfuse.errors import FedfuseError
from fedfuse.privacy.accounting import epsilon_of
from fedfuse.privacy.budget import PrivacyRequest
from fedfuse.secagg.messages import RECORD
from fedfuse.site.app import build_client_app
from fedfuse.site.policy import PolicyRefusal, SitePolicy, load_policy
from tests.helpers import ROOT, incoming
from tests.site.test_private_training import REQUEST, site_context, train_message


@pytest.fixture(scope="module")
def digits_site() -> tuple[Site, object]:
    cfg = load_config(ROOT / "simulations" / "digits.toml")
    return simulated_site(cfg, 10), plan_federation(cfg).dataset.schema


def masked(msg, members: int):
    """``msg`` asking for a masked vector in a session of ``members`` members."""
    msg.content[RECORD] = ConfigRecord({"session": bytes(16),
                                        "nodes": [str(i) for i in range(members)]})
    return msg


@pytest.mark.parametrize(("request_", "members", "rule"), [
    (None, 4, "require_dp"),  # plaintext training, no DP at all
    (dataclasses.replace(REQUEST, target_epsilon=10.0, budget=10.0), 4, "max_epsilon"),
    (REQUEST, None, "require_secure_aggregation"),  # weights in plaintext
    (REQUEST, 2, "min_cohort_size"),  # a sum of two reveals each to the other
])
def test_the_default_policy_refuses_and_no_weights_leave(digits_site, tmp_path, request_,
                                                         members, rule):
    site, schema = digits_site
    site = dataclasses.replace(site, policy=SitePolicy(), state_dir=tmp_path)
    msg = train_message(site, schema, request_)
    if members is not None:
        msg = masked(msg, members)
    with pytest.raises(PolicyRefusal, match=rf"refused by the site's policy \({rule}\)"):
        build_client_app(lambda ctx: site)(msg, site_context())
    assert not (tmp_path / "privacy-ledger.json").exists()  # nothing trained, nothing spent


def user_level(site, schema, server_round: int = 1, sigma: float = 3.0):
    """A client-level DP train message as the coordinator's ClientLevelDP sends it."""
    msg = train_message(site, schema, None, server_round)
    msg.content["config"].update({"dp-mode": "user", "dp-clipping-norm": 1.0,
                                  "dp-noise-multiplier": sigma, "dp-delta": 1e-3,
                                  "dp-accountant": "rdp"})
    return msg


def test_client_level_dp_satisfies_require_dp_only_when_the_policy_says_so(digits_site):
    site, schema = digits_site
    msg = user_level(site, schema)
    strict = dataclasses.replace(site, policy=SitePolicy(require_secure_aggregation=False))
    with pytest.raises(PolicyRefusal, match="require_dp"):
        build_client_app(lambda ctx: strict)(msg, site_context())
    lenient = dataclasses.replace(site, policy=SitePolicy(require_dp="client",
                                                          require_secure_aggregation=False))
    reply = build_client_app(lambda ctx: lenient)(msg, site_context())
    assert "arrays" in reply.content


def test_client_level_releases_are_kept_at_the_site_across_runs(digits_site, tmp_path):
    """Each run's coordinator keeps only its own account; the site's ledger keeps every
    release its update went into, across runs (a fresh Context, as after a restart),
    and declines the one that would take it over its lifetime ε."""
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path, policy=SitePolicy(
        require_dp="client", max_epsilon=3.0, require_secure_aggregation=False))
    app = build_client_app(lambda ctx: site)
    affordable = max(k for k in range(1, 40) if epsilon_of([(3.0, 1.0, k)], 1e-3) <= 3.0)
    trained = 0
    for server_round in range(1, 40):  # every message as if from a new run
        reply = app(user_level(site, schema, server_round), site_context())
        if "arrays" not in reply.content:
            break
        trained += 1
    assert trained == affordable and affordable >= 2
    report = reply.content["privacy"]
    assert report["status"] == "budget-exhausted" and report["epsilon"] <= 3.0
    ledger = json.loads((tmp_path / "client-level-ledger.json").read_text())
    assert len(ledger["history"]) == affordable and ledger["budget"] == 3.0
    assert not (tmp_path / "privacy-ledger.json").exists()  # the record-level one is apart
    with pytest.raises(FedfuseError, match="no noise"):  # a release without noise
        app(user_level(site, schema, 50, sigma=0.0), site_context())


def test_the_lifetime_budget_caps_a_request_without_one(digits_site, tmp_path):
    """A request with a fixed noise multiplier and no ε budget (unlimited, as far as the
    coordinator is concerned) is held to the site's lifetime ε."""
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path, policy=SitePolicy(
        max_epsilon=3.0, require_secure_aggregation=False))
    open_ended = PrivacyRequest(mode="sample", accountant="rdp", max_grad_norm=1.0,
                                planned_rounds=50, noise_multiplier=0.8)
    app = build_client_app(lambda ctx: site)
    statuses = []
    for server_round in range(1, 30):
        reply = app(train_message(site, schema, open_ended, server_round), site_context())
        statuses.append(reply.content["privacy"]["status"])
        if statuses[-1] != "trained":
            break
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert ledger["budget"] == 3.0 and statuses[-1] == "budget-exhausted"
    assert reply.content["privacy"]["epsilon"] <= 3.0


def test_fusion_statistics_in_plaintext_are_refused_under_the_default_policy(digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, policy=SitePolicy())
    msg = incoming(RecordDict({"fusion": ConfigRecord({"members": ["logreg"]})}),
                   message_type="query.fusion")
    with pytest.raises(PolicyRefusal, match="require_secure_aggregation"):
        build_client_app(lambda ctx: site)(msg, site_context())


def test_a_policy_file_is_read_and_checked(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('require_dp = "client"\nmax_epsilon = 2.5\nmin_cohort_size = 5\n')
    policy = load_policy(path)
    assert (policy.require_dp, policy.max_epsilon, policy.min_cohort_size) == ("client", 2.5, 5)
    assert policy.require_secure_aggregation is True  # unset keys keep the safe default
    assert policy.verify_keys is True and policy.pinned == frozenset()
    path.write_text(f'peers = ["{"ab" * 32}"]\nverify_keys = true\n')
    assert load_policy(path).pinned == {bytes.fromhex("ab" * 32)}
    assert "lifetime ε ≤ 8" in load_policy(None).summary()
    assert "model code: built-ins only" in load_policy(None).summary()
    path.write_text('allow_arch = ["hospital.models:resnet", "partner:*"]\n')
    allowing = load_policy(path).allowing(("cli.models:net", "partner:*"))
    assert allowing.allow_arch == ("hospital.models:resnet", "partner:*", "cli.models:net")
    assert "model code: hospital.models:resnet, partner:*, cli.models:net" in \
        allowing.summary()
    for text, what in (('max_epsilons = 3\n', "policy max_epsilons: unknown key"),
                       ('max_epsilon = "8"\n', "policy max_epsilon: expected a number, "
                        "got a string '8'"),
                       ('require_secure_aggregation = 1\n', "policy "
                        "require_secure_aggregation: expected true or false, got an integer"),
                       ('require_dp = "maybe"\n', "must be one of"),
                       ('min_cohort_size = 2\n', "at least 3"),
                       ('max_epsilon = 0\n', "> 0"),
                       ('max_epsilon = \n', "cannot read"),
                       ('peers = ["zz"]\n', "hex Ed25519"),
                       ('peers = [1]\n', r"policy peers\[0\]: expected a string"),
                       ('allow_arch = ["os.system"]\n', "not an import path"),
                       ('allow_arch = "a:b"\n', "policy allow_arch: expected a list"),
                       ('verify_keys = "yes"\n', "policy verify_keys: expected true or false")):
        path.write_text(text)
        with pytest.raises(FedfuseError, match=what):
            load_policy(path)
