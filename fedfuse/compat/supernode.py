"""Flower's SuperNode with short waits, and its Runtime API as a warm executor uses it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedfuse.compat import fast_object_pulls


class _Pacer:
    """The ``time`` module as the SuperNode's main loop sees it. Its idle wait (Flower's
    3 s after a pull that found nothing) starts at ``poll`` and doubles on every empty
    pull up to ``idle``, back to ``poll`` when a message arrives (:meth:`arrived`); its
    other waits (0.5 s steps while a reply is awaited) are capped at ``poll``."""

    IDLE_WAIT = 3
    """The seconds of Flower's idle wait, which tell it from the others."""

    def __init__(self, poll: float, idle: float) -> None:
        self.poll, self.idle = poll, idle
        self.next = poll

    def sleep(self, seconds: float) -> None:
        if seconds >= self.IDLE_WAIT:
            time.sleep(self.next)
            self.next = min(2 * self.next, self.idle)
        else:
            time.sleep(min(seconds, self.poll))

    def arrived(self) -> None:
        self.next = self.poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def serve_supernode(poll: float, idle: float) -> None:
    """``flower-supernode`` as Flower runs it (its arguments, checks and Runtime API),
    with its main loop's hard-coded waits paced by :class:`_Pacer` instead (``poll``
    seconds, backing off to ``idle`` while no message comes), and a message's objects
    pulled from the SuperLink without Flower's 1 s first backoff."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    pacer = _Pacer(poll, idle)
    pull = start_client_internal._pull_and_store_message

    def pull_and_store_message(**kwargs: Any) -> int | None:
        run_id: int | None = pull(**kwargs)
        if run_id is not None:
            pacer.arrived()
        return run_id

    start_client_internal.time = pacer  # type: ignore[assignment]
    start_client_internal._pull_and_store_message = pull_and_store_message  # type: ignore[assignment]
    fast_object_pulls(start_client_internal, "pull_objects")
    flower_supernode()


def _runtime_client(address: str, component: str, auth: Any) -> Any:
    """A Runtime API client that tries each call once: the executor's loop decides what a
    failure means (Flower's retry invoker, made for a one-message process, retries for
    ever while the SuperNode is gone and interrupts its own process on a 401)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component), auth])


class RuntimeTasks:
    """A SuperNode's Runtime API (loopback, ``--isolation process``) seen by its executor:
    tasks acquired with the SuperExec secret, as ``flower-superexec`` does."""

    CONTENT_WAIT = 60.0
    """Seconds a task waits for its message's content to reach the SuperNode before it is
    given up (Flower's default is two hours): a coordinator that died while sending it
    would otherwise hold the site, and its next messages, that long."""

    def __init__(self, address: str, secret: bytes) -> None:
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
        from flwr.supernode.runtime import run_clientapp

        fast_object_pulls(run_clientapp, "pull_and_inflate_object_from_tree",
                          max_time=self.CONTENT_WAIT)
        self.address = address
        self.client = _runtime_client(address, "SuperExec", SuperExecAuthHttpInterceptor(
            master_secret=secret,
            protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))

    def acquire(self) -> str | None:
        """The token of a pending ClientApp task, claimed; None when none is pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP]))
        return str(res.token) if res.HasField("task") and res.token else None

    @contextmanager
    def task(self, token: str) -> Iterator[TaskIO]:
        """One claimed task's input and output, with its heartbeats, as ``flwr-clientapp``
        handles a task (``supernode/runtime/run_clientapp.py``)."""
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor

        client = _runtime_client(self.address, "flwr-clientapp",
                                 RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        try:
            yield TaskIO(client)
        finally:
            heartbeat.stop()
            client.close()

    def close(self) -> None:
        self.client.close()


class TaskIO:
    """Pull a task's message and context; push its reply, then its final context."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def pull(self) -> tuple[Any, Any, bytes]:
        """The task's message, the run's context and the run's FAB (bytes)."""
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        message, context, _, fab = pull_task_input(self.client)
        return message, context, bytes(fab.content)

    def push(self, reply: Any, context: Any) -> None:
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(self.client, reply, context)

    def finish(self, context: Any, failure: str | None) -> None:
        """End the task (the SuperNode keeps ``context`` for the run's next task)."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(self.client, context,
                         SubStatus.FAILED if failure else SubStatus.COMPLETED, failure or "")


def error_reply(message: Any, exc: BaseException) -> Any:
    """The reply Flower's ClientApp runtime sends when an app raises ``exc``."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)


def context_bytes(context: Any) -> bytes:
    """A Flower ``Context`` serialised (Flower's own protobuf form)."""
    from flwr.common.serde import context_to_proto

    data: bytes = context_to_proto(context).SerializeToString()
    return data


def context_from_bytes(data: bytes) -> Any:
    from flwr.common.serde import context_from_proto
    from flwr.proto.message_pb2 import Context as ContextProto

    proto = ContextProto()
    proto.ParseFromString(data)
    return context_from_proto(proto)


