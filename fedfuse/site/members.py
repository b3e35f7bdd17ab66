"""The models a message asks a site to run: its cohort model, or the stacking head and
the members it combines (``member/<arch>`` records), rebuilt from the message."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Message

from fedfuse import wire
from fedfuse.data.sites import Site
from fedfuse.errors import FedfuseError
from fedfuse.fusion.stacking import HEAD, StackedModel, load_head, stack_features
from fedfuse.models.registry import build_model, load_model


def member_models(msg: Message, site: Site, names: list[str]) -> list[torch.nn.Module]:
    """The models named ``names`` from the message's ``member/<name>`` records; the
    stacking head (``stack``) comes with the members listed in its "stack" record."""
    models: list[torch.nn.Module] = []
    for name in names:
        state = wire.arrays(msg, f"member/{name}").to_torch_state_dict()
        if name == HEAD:
            models.append(StackedModel(head_members(msg, site), load_head(state)))
        else:
            models.append(site_model(site, name, state))
    return models


def site_model(site: Site, name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Cohort ``name``'s model with ``state``, built as the site's scenario says and
    only from code the site allows; a cohort the scenario lacks is refused."""
    spec = site.models.get(name)
    if spec is None:
        raise FedfuseError(f"no cohort of this site's scenario is named {name!r}")
    return load_model(spec, site.train.schema, state, code=site.code, key=f"cohort {name}")


def own_model(site: Site) -> torch.nn.Module:
    """A fresh model of the site's cohort, built only from code the site allows."""
    return build_model(site.models[site.arch], site.train.schema, code=site.code,
                       key=f"cohort {site.arch}")


def trainee(msg: Message, site: Site) -> tuple[torch.nn.Module, np.ndarray]:
    """What a train message trains, and on which inputs: the site's cohort model on its
    training split; or, when the message carries a "stack" record, the stacking head
    on the members' probabilities for that split (``fedfuse.fusion.stacking``)."""
    state = wire.arrays(msg, "arrays").to_torch_state_dict()
    if HEAD not in msg.content:
        return site_model(site, site.arch, state), site.train.X
    return load_head(state), stack_features(head_members(msg, site), site.train.X)


def head_members(msg: Message, site: Site) -> list[torch.nn.Module]:
    """The members the stacking head combines, in its "stack" record's order."""
    return member_models(msg, site, wire.as_list(wire.config(msg, HEAD), "members", str))
