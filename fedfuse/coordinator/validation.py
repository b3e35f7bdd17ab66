"""Federated evaluation folded into the train exchange.

A site sampled for evaluation scores the global model it received on its validation
split before it trains, and reports the figures in its train reply (MetricRecord
``validation`` {num-examples, val-loss, val-accuracy}, ``num-examples`` counting
validation examples). A site sampled for evaluation that gets no train message (not
sampled for training, retired, out of budget, out of the secure session) gets an
evaluate message in the same exchange. So the validation metrics of round r describe
the model the sites received in round r: the aggregate of round r - 1.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fedfuse.wire import VALIDATE, VALIDATION


def fold(train: dict[str, list[Message]], evaluate: dict[str, list[Message]]
         ) -> dict[str, list[Message]]:
    """Per group, one message per node: the train messages (those to nodes sampled for
    evaluation asking for validation first), then the evaluate messages to the nodes
    sampled for evaluation that get no train message."""
    out: dict[str, list[Message]] = {}
    for group in {**train, **evaluate}:
        sent = train.get(group, [])
        wanted = {m.metadata.dst_node_id for m in evaluate.get(group, [])}
        trained = {m.metadata.dst_node_id for m in sent}
        out[group] = [validating(m) if m.metadata.dst_node_id in wanted else m for m in sent]
        out[group] += [m for m in evaluate.get(group, []) if m.metadata.dst_node_id not in trained]
    return out


def validating(msg: Message) -> Message:
    """``msg`` with its own copy of the content whose config asks for validation (a
    strategy's messages share one content)."""
    content = RecordDict(dict(msg.content))
    content["config"] = ConfigRecord({**msg.content.config_records["config"], VALIDATE: True})
    msg.content = content
    return msg


def split(sent: dict[str, list[Message]], replies: dict[str, list[Message]]
          ) -> tuple[dict[str, list[Message]], dict[str, list[Message]]]:
    """Per group: the train replies (their validation record removed, so that the
    strategy aggregates only the update) and the validation replies, as evaluate
    replies (MetricRecord ``metrics``) to the ``sent`` messages, in arrival order."""
    asked = {m.metadata.dst_node_id: m for msgs in sent.values() for m in msgs}
    trained: dict[str, list[Message]] = {}
    validation: dict[str, list[Message]] = {}
    for group, got in replies.items():
        trained[group], validation[group] = [], []
        for reply in got:
            if reply.metadata.message_type == "evaluate":
                validation[group].append(reply)
                continue
            trained[group].append(reply)
            if not reply.has_error() and VALIDATION in reply.content.metric_records:
                figures = reply.content.metric_records[VALIDATION]
                del reply.content[VALIDATION]
                validation[group].append(Message(RecordDict({"metrics": figures}),
                                                 reply_to=asked[reply.metadata.src_node_id]))
    return trained, validation
