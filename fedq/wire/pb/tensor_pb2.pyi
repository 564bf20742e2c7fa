from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    QUANTIZED: _ClassVar[Encoding]
    RAW: _ClassVar[Encoding]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    TENSOR: _ClassVar[Granularity]
    CHANNEL: _ClassVar[Granularity]
    GROUP: _ClassVar[Granularity]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
ENCODING_UNSPECIFIED: Encoding
QUANTIZED: Encoding
RAW: Encoding
GRANULARITY_UNSPECIFIED: Granularity
TENSOR: Granularity
CHANNEL: Granularity
GROUP: Granularity

class PackedTensor(_message.Message):
    __slots__ = ("format_version", "name", "shape", "dtype", "encoding", "granularity", "axis", "group_size", "symmetric", "scale_dtype", "bits", "scales", "offsets", "payload", "row_scales", "outlier_index", "outlier_values")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SYMMETRIC_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ROW_SCALES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    encoding: Encoding
    granularity: Granularity
    axis: int
    group_size: int
    symmetric: bool
    scale_dtype: DType
    bits: bytes
    scales: bytes
    offsets: bytes
    payload: bytes
    row_scales: bytes
    outlier_index: bytes
    outlier_values: bytes
    def __init__(self, format_version: _Optional[int] = ..., name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., granularity: _Optional[_Union[Granularity, str]] = ..., axis: _Optional[int] = ..., group_size: _Optional[int] = ..., symmetric: _Optional[bool] = ..., scale_dtype: _Optional[_Union[DType, str]] = ..., bits: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., row_scales: _Optional[bytes] = ..., outlier_index: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ...) -> None: ...

class TensorBundle(_message.Message):
    __slots__ = ("format_version", "tensors")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[PackedTensor]
    def __init__(self, format_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[PackedTensor, _Mapping]]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("format_version", "kind", "client_id", "round", "step", "payload_size", "scalars", "tags")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    kind: str
    client_id: str
    round: int
    step: int
    payload_size: int
    scalars: _containers.ScalarMap[str, float]
    tags: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., kind: _Optional[str] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., payload_size: _Optional[int] = ..., scalars: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...
