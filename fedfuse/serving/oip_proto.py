"""The Open Inference Protocol's gRPC messages (package ``inference``), built at import
from a declaration of their fields: no generated code, no protoc, and the field numbers
in one readable table.

The messages are those of the protocol's ``GRPCInferenceService`` that fedfuse serves
(liveness, readiness, metadata, inference), with the protocol's field numbers, so any
OIP client (KServe's, Triton's, MLServer's) reads and writes them. gRPC server
reflection serves them from :data:`POOL`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = "GRPCInferenceService"

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {"bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
          "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
          "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE}

PARAMETERS = "map<InferParameter>"
"""A ``map<string, InferParameter>`` field."""

MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    # (field, number, type): "repeated T" for lists, a message name for a message
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"),
                               ("extensions", 3, "repeated string")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "repeated int64")],
    "ModelMetadataResponse": [("name", 1, "string"), ("versions", 2, "repeated string"),
                              ("platform", 3, "string"),
                              ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
                              ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata"),
                              ("parameters", 6, PARAMETERS)],
    "InferParameter": [("bool_param", 1, "bool?"), ("int64_param", 2, "int64?"),
                       ("string_param", 3, "string?"), ("double_param", 4, "double?"),
                       ("uint64_param", 5, "uint64?")],
    "InferTensorContents": [("bool_contents", 1, "repeated bool"),
                            ("int_contents", 2, "repeated int32"),
                            ("int64_contents", 3, "repeated int64"),
                            ("uint_contents", 4, "repeated uint32"),
                            ("uint64_contents", 5, "repeated uint64"),
                            ("fp32_contents", 6, "repeated float"),
                            ("fp64_contents", 7, "repeated double"),
                            ("bytes_contents", 8, "repeated bytes")],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64"),
        ("parameters", 4, PARAMETERS), ("contents", 5, "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"),
                                                     ("parameters", 2, PARAMETERS)],
    "ModelInferRequest": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
        ("parameters", 4, PARAMETERS),
        ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "repeated bytes")],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64"),
        ("parameters", 4, PARAMETERS), ("contents", 5, "InferTensorContents")],
    "ModelInferResponse": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
        ("parameters", 4, PARAMETERS),
        ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "repeated bytes")],
}
"""Every message, by its name (``Outer.Inner`` for a nested one). A type ending in ``?``
is a member of the message's ``parameter_choice`` oneof."""

RPCS = {name: (f"{name}Request", f"{name}Response") for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelInfer")}


def _field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: str
           ) -> None:
    field = message.field.add(name=name, number=number)
    repeated = kind.startswith("repeated ")
    kind = kind.removeprefix("repeated ")
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if kind == PARAMETERS:  # a map is a repeated nested entry message (key 1, value 2)
        entry = message.nested_type.add(name="ParametersEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE,
                        type_name=f".{PACKAGE}.InferParameter", label=_F.LABEL_OPTIONAL)
        field.label, field.type = _F.LABEL_REPEATED, _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{message.name}.ParametersEntry" \
            if "." not in message.name else ""
        return
    if kind.endswith("?"):
        if not message.oneof_decl:
            message.oneof_decl.add(name="parameter_choice")
        field.oneof_index, kind = 0, kind[:-1]
    if kind in _TYPES:
        field.type = _TYPES[kind]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="fedfuse/open_inference.proto",
                                               package=PACKAGE, syntax="proto3")
    outer: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields in MESSAGES.items():
        head, _, inner = full.partition(".")
        if inner:  # nested: declared before its outer message, which exists by name only
            parent = outer.setdefault(head, descriptor_pb2.DescriptorProto(name=head))
            message = parent.nested_type.add(name=inner)
        else:
            message = outer.setdefault(head, descriptor_pb2.DescriptorProto(name=head))
        for name, number, kind in fields:
            _field(message, name, number, kind)
            if kind == PARAMETERS and inner:  # the entry sits inside the nested message
                message.field[-1].type_name = f".{PACKAGE}.{full}.ParametersEntry"
    proto.message_type.extend(outer.values())
    service = proto.service.add(name=SERVICE)
    for rpc, (request, response) in RPCS.items():
        service.method.add(name=rpc, input_type=f".{PACKAGE}.{request}",
                           output_type=f".{PACKAGE}.{response}")
    return proto


POOL = descriptor_pool.DescriptorPool()
"""A pool of fedfuse's own: the ``inference`` package of a client library imported in
the same process (Triton's, say) lives in protobuf's default pool without clashing."""
POOL.Add(_file())

messages: dict[str, Any] = {
    name: message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
    for name in MESSAGES}
"""The message classes by name: ``messages["ModelInferRequest"]()``."""
