from fedq.wire.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskRequest(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "reason", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("client_id", "num_examples")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    num_examples: int
    def __init__(self, client_id: _Optional[str] = ..., num_examples: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "fedq_version", "wire_format_version", "clients", "node")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDQ_VERSION_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    fedq_version: str
    wire_format_version: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientInfo]
    node: str
    def __init__(self, protocol_version: _Optional[int] = ..., fedq_version: _Optional[str] = ..., wire_format_version: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientInfo, _Mapping]]] = ..., node: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("run_id", "protocol_version", "fedq_version", "wire_format_version", "config_json", "client_index", "num_classes", "input_dim")
    class ClientIndexEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDQ_VERSION_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    protocol_version: int
    fedq_version: str
    wire_format_version: int
    config_json: str
    client_index: _containers.ScalarMap[str, int]
    num_classes: int
    input_dim: int
    def __init__(self, run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., fedq_version: _Optional[str] = ..., wire_format_version: _Optional[int] = ..., config_json: _Optional[str] = ..., client_index: _Optional[_Mapping[str, int]] = ..., num_classes: _Optional[int] = ..., input_dim: _Optional[int] = ...) -> None: ...

class WorkRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("client_id", "round", "deadline_s")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    deadline_s: float
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("action", "tasks", "reason", "round")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[WorkItem.Action]
        WAIT: _ClassVar[WorkItem.Action]
        TASK: _ClassVar[WorkItem.Action]
        DONE: _ClassVar[WorkItem.Action]
    ACTION_UNSPECIFIED: WorkItem.Action
    WAIT: WorkItem.Action
    TASK: WorkItem.Action
    DONE: WorkItem.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    action: WorkItem.Action
    tasks: _containers.RepeatedCompositeFieldContainer[Assignment]
    reason: str
    round: int
    def __init__(self, action: _Optional[_Union[WorkItem.Action, str]] = ..., tasks: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., reason: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
