"""The models a message asks a site to run: its cohort model, or the stacking head and
the members it combines (``member/<arch>`` records), rebuilt from the message."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Message

from fedfuse import wire
from fedfuse.data.sites import Site
from fedfuse.fusion.stacking import HEAD, StackedModel, load_head, stack_features
from fedfuse.models.registry import load_model


def member_models(msg: Message, site: Site, names: list[str]) -> list[torch.nn.Module]:
    """The models named ``names`` from the message's ``member/<name>`` records; the
    stacking head (``stack``) comes with the members listed in its "stack" record."""
    models: list[torch.nn.Module] = []
    for name in names:
        state = wire.arrays(msg, f"member/{name}").to_torch_state_dict()
        if name == HEAD:
            models.append(StackedModel(head_members(msg, site), load_head(state)))
        else:
            models.append(load_model(name, site.train.schema, state))
    return models


def trainee(msg: Message, site: Site) -> tuple[torch.nn.Module, np.ndarray]:
    """What a train message trains, and on which inputs: the site's cohort model on its
    training split; or, when the message carries a "stack" record, the stacking head
    on the members' probabilities for that split (``fedfuse.fusion.stacking``)."""
    state = wire.arrays(msg, "arrays").to_torch_state_dict()
    if HEAD not in msg.content:
        return load_model(site.arch, site.train.schema, state), site.train.X
    return load_head(state), stack_features(head_members(msg, site), site.train.X)


def head_members(msg: Message, site: Site) -> list[torch.nn.Module]:
    """The members the stacking head combines, in its "stack" record's order."""
    return member_models(msg, site, wire.as_list(wire.config(msg, HEAD), "members", str))
