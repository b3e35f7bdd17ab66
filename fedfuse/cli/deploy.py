"""A deployment's commands: ``fedfuse certs init``, ``partition``, ``coordinator`` and
``site``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfuse.cli.app import app
from fedfuse.cli.common import (
    AllowArch,
    SigningKey,
    console,
    print_summary,
    reports_errors,
    setup_logging,
    signing_key_path,
    stop_on_sigterm,
    tracking_from_env,
)
from fedfuse.errors import FedfuseError

certs_app = typer.Typer(no_args_is_help=True, help="Key material of a deployment.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
@reports_errors
def certs_init(
    directory: Annotated[Path, typer.Argument(help="certificates directory (created)")],
    host: Annotated[Optional[list[str]], typer.Option(
        help="a name or address the sites use to reach the coordinator (repeatable); "
             "localhost and 127.0.0.1 are always included")] = None,
    demo_sites: Annotated[Optional[str], typer.Option(
        help="one-machine walk-through only: also make these sites' key pairs here, at "
             "the coordinator (comma-separated). Real sites make their own: `fedfuse site "
             "init`, then `fedfuse certs add-site`")] = None,
) -> None:
    """Create a CA and the coordinator's TLS certificate.

    Re-running adds what is missing and never replaces a key."""
    from fedfuse.deploy.certs import DEFAULT_HOSTS, init_certs

    names = [n.strip() for n in (demo_sites or "").split(",") if n.strip()]
    if demo_sites is not None and not names:
        raise FedfuseError("--demo-sites names no site")
    created = init_certs(directory, names, [*DEFAULT_HOSTS, *(host or [])])
    for path in created:
        console.print(f"created {path}")
    if not created:
        console.print(f"{directory}: nothing to create (every key exists)")
    if names:
        console.print("note: the --demo-sites key pairs were made here, at the coordinator, "
                      "which could then impersonate those sites; real sites run `fedfuse "
                      "site init` and send only their auth.pub", markup=False)


@certs_app.command("add-site")
@reports_errors
def certs_add_site(
    directory: Annotated[Path, typer.Argument(help="the coordinator's certificates directory")],
    name: Annotated[str, typer.Option(help="the site's name, as in the scenario")],
    pub: Annotated[Path, typer.Option(help="the site's auth.pub (from `fedfuse site init`)")],
) -> None:
    """Register a site's public key: the coordinator admits the sites registered here
    that its scenario lists (it never sees their private keys)."""
    from fedfuse.deploy.certs import add_site

    path = add_site(directory, name, pub)
    console.print(f"site {name}: public key registered in {path}", markup=False)


@app.command()
@reports_errors
def partition(
    config: Annotated[Path, typer.Argument(help="scenario TOML file")],
    out: Annotated[Path, typer.Option(help="directory for the .npz files")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key (repeatable)")] = None,
) -> None:
    """Write the scenario's split as files: one .npz per site (or client) and test.npz.

    For trying a deployment on one machine."""
    from fedfuse.config import load_config
    from fedfuse.data.sites import write_partitions

    paths = write_partitions(load_config(config, overrides=set_ or []), out)
    for path in paths:
        console.print(f"wrote {path}")


@app.command()
@reports_errors
def coordinator(
    certs: Annotated[Path, typer.Option(help="certificates directory (fedfuse certs init)")],
    config: Annotated[Optional[Path], typer.Argument(
        help="scenario TOML; every cohort lists its sites (with --resume: optional, and "
             "must be the interrupted run's)")] = None,
    address: Annotated[str, typer.Option(help="address the sites connect to")] = "0.0.0.0:9092",
    out: Annotated[Optional[Path], typer.Option(help="run directory to create")] = None,
    state: Annotated[Path, typer.Option(
        help="the coordinator's working directory (SuperLink log, installed app)")] = Path(
        "coordinator-state"),
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key: --set rounds=5 (repeatable)")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="continue the interrupted run that was to become this run directory, from "
             "its last complete round, with the same sites (same --state)")] = None,
    signing_key: SigningKey = None,
) -> None:
    """Run a scenario across partner sites (SuperLink with TLS and node authentication).

    Writes the same run directory, fused artifact included, as simulate, with a
    checkpoint after every round: after a crash, Ctrl-C or kill -9, run it again with
    --resume RUN_DIR."""
    from fedfuse.artifact.rundir import resumable_config
    from fedfuse.config import load_config

    if config is None and resume is None:
        raise FedfuseError("give a scenario file, or --resume RUN_DIR")
    if resume is not None and (set_ or out):
        raise FedfuseError("--resume continues a run with its own settings; --set and --out "
                           "do not apply")
    setup_logging(False)
    stop_on_sigterm()
    scenario = config if config is not None else resumable_config(resume)  # type: ignore[arg-type]
    cfg = load_config(scenario, overrides=set_ or [])
    tracking_from_env(cfg)
    from fedfuse.deploy.coordinator import run_coordinator
    from fedfuse.simulation.runner import default_run_dir

    run_dir = resume or out or default_run_dir(cfg)
    summary = run_coordinator(cfg, certs, address, run_dir, state,
                              lambda text: console.print(text, end="", markup=False,
                                                         highlight=False),
                              resume=resume is not None,
                              signing_key=signing_key_path(signing_key))
    print_summary(cfg.name, summary)
    console.print(f"run directory: {run_dir}")


site_app = typer.Typer(help="A partner site: make its keys (init), or join a federation.")
app.add_typer(site_app, name="site")


@site_app.callback(invoke_without_command=True)
@reports_errors
def site(
    ctx: typer.Context,
    coordinator: Annotated[Optional[str], typer.Option(help="the coordinator's HOST:PORT")]
    = None,
    certs: Annotated[Optional[Path], typer.Option(
        help="this site's copy of the certificates directory (ca.pem)")] = None,
    name: Annotated[Optional[str], typer.Option(help="this site's name, as in the scenario")]
    = None,
    data: Annotated[Optional[Path], typer.Option(help="this site's data (.npz or .csv)")]
    = None,
    state: Annotated[Optional[Path], typer.Option(
        help="state directory: its keys, privacy ledger, site secret [site-NAME-state]")]
    = None,
    runtime_port: Annotated[int, typer.Option(
        help="local port of the SuperNode's Runtime API (one per site on a machine)")] = 9094,
    connect_timeout: Annotated[float, typer.Option(
        help="seconds to retry an unreachable coordinator at start-up")] = 120.0,
    max_wait: Annotated[float, typer.Option(
        help="seconds to keep reconnecting after losing the coordinator")] = 600.0,
    device: Annotated[str, typer.Option(
        help="cpu, cuda, cuda:N or auto: where this site trains")] = "cpu",
    policy: Annotated[Optional[Path], typer.Option(
        help="this site's privacy policy (TOML; docs/privacy.md#the-sites-policy) "
             "[the default: record-level DP, lifetime ε ≤ 8, secure aggregation]")] = None,
    allow_arch: AllowArch = None,
    verbose: Annotated[bool, typer.Option(
        help="log every message this site handles, with its time")] = False,
) -> None:
    """Join a federation as a partner site (a Flower SuperNode on this site's data).

    The data never leave the site; its keys, secret and privacy ledger persist in
    --state. `fedfuse site init` makes its keys first."""
    if ctx.invoked_subcommand is not None:
        return
    import logging

    from fedfuse.deploy.site import SiteOptions, run_site

    missing = [f"--{k}" for k, v in (("coordinator", coordinator), ("certs", certs),
                                     ("name", name), ("data", data)) if v is None]
    if missing:
        raise FedfuseError(f"fedfuse site needs {', '.join(missing)} (or run `fedfuse site "
                           "init` to make the site's keys)")
    assert coordinator and certs and name and data
    setup_logging(False)
    if verbose:
        logging.getLogger("fedfuse.site").setLevel(logging.DEBUG)
    stop_on_sigterm()
    opts = SiteOptions(coordinator=coordinator, certs=certs, name=name, data=data,
                       state=state or Path(f"site-{name}-state"), runtime_port=runtime_port,
                       connect_timeout=connect_timeout, max_wait=max_wait, device=device,
                       policy=policy, allow_arch=tuple(allow_arch or ()))
    run_site(opts, lambda text: console.print(text, markup=False, highlight=False))


@site_app.command("init")
@reports_errors
def site_init(
    name: Annotated[str, typer.Option(help="this site's name, as in the scenario")],
    state: Annotated[Optional[Path], typer.Option(
        help="state directory [site-NAME-state]")] = None,
) -> None:
    """Make this site's node-authentication key pair and secret, here at the site: the
    private key never leaves it; hand auth.pub to the coordinator."""
    from fedfuse.deploy.site import identity, init_site

    directory = state or Path(f"site-{name}-state")
    pub, made = init_site(name, directory)
    console.print(f"site {name}: {'made' if made else 'kept'} its key pair in {directory} "
                  f"(auth.key stays here); give the coordinator {pub} to register with "
                  f"`fedfuse certs add-site CERTS --name {name} --pub auth.pub`",
                  markup=False, highlight=False)
    console.print(f"site {name}: secure-aggregation identity {identity(directory)} (other "
                  "sites may pin it in their policy's peers)", markup=False, highlight=False)
