import pickle
import tomllib
from functools import partial

from flwr.app import Context, RecordDict
from ray import cloudpickle

from fedfuse.config import config_from_dict
from fedfuse.data.sites import simulated_site
from fedfuse.simulation.runner import site_from_context
from fedfuse.site.app import build_client_app
from tests.helpers import SMALL_SCENARIO, incoming


def test_the_client_app_pickles_as_its_recipe_and_still_answers():
    """Flower's engine pickles the ClientApp with every message: ours is a few KB, not
    its handlers by value, and the copy answers like the original."""
    cfg = config_from_dict(tomllib.loads(SMALL_SCENARIO))
    app = build_client_app(partial(site_from_context, cfg, None), 1)
    blob = cloudpickle.dumps(lambda: app)  # as the engine ships it: inside a closure
    assert len(blob) < 8_000
    clone = pickle.loads(blob)()
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 2},
                      state=RecordDict(), run_config={})
    reply = clone(incoming(RecordDict(), "query", node_id=5), context)
    assert reply.content["site"]["name"] == "client-2"
    assert reply.content["site"]["arch"] == cfg.cohort_of(2).arch
    assert reply.content["metrics"]["num-examples"] == len(simulated_site(cfg, 2).train)
