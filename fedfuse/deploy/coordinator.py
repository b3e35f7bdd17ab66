"""``fedfuse coordinator``: Flower's SuperLink with TLS and node authentication, the
listed sites' keys registered, and the fedfuse ServerApp submitted as one run.

Steps: check the certificates and the scenario -> start Flower's SuperLink (TLS, only
registered keys may join, only the Fleet API reachable from other machines: see
``fedfuse.deploy.superlink``) -> register each listed site's public key, remembering the
node id Flower gives it -> submit a FAB whose components are ``fedfuse.deploy.apps``
-> relay the run's log until it finishes -> stop the SuperLink. The ServerApp writes
the run directory, fused artifact included, exactly as a simulation does, with a
checkpoint after every round.

The SuperLink keeps its state (registered nodes, runs) in ``<state>/superlink.db``, so a
coordinator restarted after a crash, Ctrl-C or kill -9 (``resume``) admits the same sites
under the node ids they already hold, and its run continues from the interrupted run
directory's last complete round (``fedfuse.artifact.rundir``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedfuse import __version__
from fedfuse.artifact.rundir import partial_path, resumable_config
from fedfuse.artifact.signing import signing_key as load_signing_key
from fedfuse.compat import ControlClient, build_fab
from fedfuse.config import FedfuseConfig, config_from_dict
from fedfuse.config.preflight import check_scenario
from fedfuse.data.datasets import load_dataset
from fedfuse.deploy.apps import run_config
from fedfuse.deploy.certs import CertsDir, check_server_certificate, load_site_public_key
from fedfuse.deploy.process import FlowerProcess, strip_ansi
from fedfuse.errors import ConfigError, FedfuseError

CONNECT_TIMEOUT = 60.0
"""Seconds to wait for the freshly started SuperLink to answer."""
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05"
"""How often the SuperLink's SuperExec looks for the ServerApp task to launch (Flower's
default: every 1 s)."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FedfuseError(f"address {text!r} is not HOST:PORT (for example 0.0.0.0:9092)")
        return cls(host.strip("[]"), int(port))

    @property
    def local(self) -> str:
        """How this machine reaches a server bound here (wildcards mean loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"


def check_deployment(cfg: FedfuseConfig, certs: CertsDir) -> dict[str, bytes]:
    """Refuse, before anything starts, a scenario that cannot be deployed with ``certs``;
    returns each listed site's public key."""
    for i, cohort in enumerate(cfg.cohorts):
        if cohort.sites is None:
            raise ConfigError(f"cohorts[{i}].sites", "a deployment needs the names of the "
                              f"sites in cohort {cohort.name!r}, e.g. sites = [\"a\", \"b\"]")
    check_server_certificate(certs)
    return {name: load_site_public_key(certs, name) for name in cfg.site_names}


def check_resumable(cfg: FedfuseConfig, out: Path) -> None:
    """``out`` holds an interrupted run of this very scenario."""
    saved = config_from_dict(tomllib.loads(resumable_config(out).read_text(encoding="utf-8")))
    if saved.to_toml() != cfg.to_toml():
        raise FedfuseError(f"the interrupted run in {partial_path(out)} ran another scenario "
                           f"than this one; resume it with its own (leave out the scenario "
                           f"file, or give {resumable_config(out)})")


def fab_bytes(version: str = __version__) -> bytes:
    """The Flower App Bundle: only a pyproject naming fedfuse's installed apps, so every
    party runs its own installed fedfuse, never code shipped over the network."""
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedfuse-federation", "version": version, "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedfuse",
            "components": {"serverapp": "fedfuse.deploy.apps:server_app",
                           "clientapp": "fedfuse.deploy.apps:client_app"},
            "config": {"scenario": "", "class-labels": "[]", "run-dir": "", "sites": "{}",
                       "resume": "false", "signing-key": ""},
        }}},
    }
    return build_fab({"pyproject.toml": tomli_w.dumps(project).encode()})


class Control:
    """The coordinator's use of the SuperLink's Control API (``fedfuse.compat``)."""

    def __init__(self, address: str, ca: Path) -> None:
        self.client = ControlClient(address, ca.read_bytes())

    def wait_ready(self, superlink: FlowerProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if superlink.poll() is not None:
                raise FedfuseError(f"the SuperLink exited with status {superlink.poll()}:\n"
                                   f"{superlink.tail()}")
            try:
                self.client.list_nodes()
                return
            except Exception as exc:  # any transport error means "not yet"
                if time.monotonic() > deadline:
                    raise FedfuseError(f"the SuperLink did not answer within {timeout:.0f} "
                                       f"s ({exc}); its log:\n{superlink.tail()}") from None
                time.sleep(0.5)

    def register(self, keys: dict[str, bytes]) -> dict[int, str]:
        """Register each site's public key; returns node id -> site name."""
        nodes = {}
        for name, key in keys.items():
            node_id = self.client.register_node(key, name)
            if not node_id:
                raise FedfuseError(f"the SuperLink refused to register site {name!r}")
            nodes[node_id] = name
        return nodes

    def start_run(self, fab: bytes, config: dict[str, Any]) -> int:
        run_id = self.client.start_run(fab, hashlib.sha256(fab).hexdigest(), config)
        if run_id is None:
            raise FedfuseError("the SuperLink did not start the run")
        return run_id

    def follow(self, run_id: int, echo: Callable[[str], None]) -> str:
        """Relay the run's log to ``echo`` until the run finishes; returns its sub-status
        (``completed``, ``failed`` or ``stopped``)."""
        after = 0.0
        while True:
            try:
                for text, timestamp in self.client.stream_logs(run_id, after):
                    if text:
                        echo(strip_ansi(text))
                    after = max(after, timestamp)
            except Exception:  # the stream is best effort; the status below is not
                time.sleep(1.0)
            status, sub_status = self.client.run_status(run_id)
            if status == "finished":
                return sub_status

    def stop_run(self, run_id: int) -> None:
        self.client.stop_run(run_id)


def run_coordinator(cfg: FedfuseConfig, certs_dir: Path, address: str, out: Path,
                    state_dir: Path, echo: Callable[[str], None],
                    resume: bool = False, signing_key: Path | None = None) -> dict[str, Any]:
    """Serve ``cfg`` to the sites listed in it and return the run's summary; with
    ``resume``, ``out`` is an interrupted run of ``cfg``, continued. ``signing_key``: the
    key file that signs the fused artifact (made if absent)."""
    certs = CertsDir(certs_dir)
    keys = check_deployment(cfg, certs)
    where = Address.parse(address)
    test = load_dataset(cfg.data)
    check_scenario(cfg, test.schema, test)  # refused here, not mid-run
    out = out.resolve()
    if out.exists():
        raise FedfuseError(f"output directory already exists: {out} (choose another --out)")
    if resume:
        check_resumable(cfg, out)
    elif partial_path(out).exists():
        raise FedfuseError(f"{partial_path(out)} holds an interrupted run: continue it with "
                           f"`fedfuse coordinator --resume {out}`, or delete it")
    if signing_key is not None:
        load_signing_key(signing_key)  # made, or refused, before any site is involved
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedfuse.deploy.superlink",
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str((state_dir / "superlink.db").resolve()),
            "--host", where.host, "--port", str(where.port)]
    with FlowerProcess(argv, state_dir / "superlink.log", state_dir / "flwr",
                       {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL}) as superlink:
        control = Control(where.local, certs.ca_cert)
        control.wait_ready(superlink, CONNECT_TIMEOUT)
        nodes = control.register(keys)
        echo(f"SuperLink on {where.host}:{where.port} (TLS, node authentication); "
             f"admitted sites: {', '.join(sorted(nodes.values()))}\n")
        run_id = control.start_run(fab_bytes(), run_config(cfg, test.schema.class_labels, out,
                                                           nodes, resume, signing_key))
        try:
            outcome = control.follow(run_id, echo)
        except BaseException:
            control.stop_run(run_id)
            raise
    if outcome != "completed" or not (out / "summary.json").is_file():
        raise FedfuseError(f"the federated run {outcome} without a result; the run's log is "
                           f"above, the SuperLink's in {state_dir / 'superlink.log'}")
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))
