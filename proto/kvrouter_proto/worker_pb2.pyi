from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_SOURCE_NONE: _ClassVar[CacheSource]
    CACHE_SOURCE_LIVE: _ClassVar[CacheSource]
    CACHE_SOURCE_RAM: _ClassVar[CacheSource]
    CACHE_SOURCE_DISK: _ClassVar[CacheSource]
CACHE_SOURCE_NONE: CacheSource
CACHE_SOURCE_LIVE: CacheSource
CACHE_SOURCE_RAM: CacheSource
CACHE_SOURCE_DISK: CacheSource

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "namespace", "anchor_tokens", "text_preview", "hint_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    HINT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    namespace: str
    anchor_tokens: int
    text_preview: str
    hint_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., namespace: _Optional[str] = ..., anchor_tokens: _Optional[int] = ..., text_preview: _Optional[str] = ..., hint_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("token_ids", "text", "cached_tokens", "cache_source")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    cached_tokens: int
    cache_source: CacheSource
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., cache_source: _Optional[_Union[CacheSource, str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_source", "prefill_seconds", "load_seconds", "loaded_bytes", "load_read_seconds", "load_device_seconds", "load_build_seconds")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_source: CacheSource
    prefill_seconds: float
    load_seconds: float
    loaded_bytes: int
    load_read_seconds: float
    load_device_seconds: float
    load_build_seconds: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., cache_source: _Optional[_Union[CacheSource, str]] = ..., prefill_seconds: _Optional[float] = ..., load_seconds: _Optional[float] = ..., loaded_bytes: _Optional[int] = ..., load_read_seconds: _Optional[float] = ..., load_device_seconds: _Optional[float] = ..., load_build_seconds: _Optional[float] = ...) -> None: ...

class Rates(_message.Message):
    __slots__ = ("prefill_tokens_per_second", "disk_load_bytes_per_second", "ram_load_bytes_per_second", "decode_tokens_per_second", "prefill_fixed_seconds", "prefill_linear_seconds_per_token", "prefill_quadratic_seconds_per_token2", "disk_cold_bytes_per_second", "disk_warm_bytes_per_second")
    PREFILL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DISK_LOAD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RAM_LOAD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIXED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LINEAR_SECONDS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUADRATIC_SECONDS_PER_TOKEN2_FIELD_NUMBER: _ClassVar[int]
    DISK_COLD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DISK_WARM_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    prefill_tokens_per_second: float
    disk_load_bytes_per_second: float
    ram_load_bytes_per_second: float
    decode_tokens_per_second: float
    prefill_fixed_seconds: float
    prefill_linear_seconds_per_token: float
    prefill_quadratic_seconds_per_token2: float
    disk_cold_bytes_per_second: float
    disk_warm_bytes_per_second: float
    def __init__(self, prefill_tokens_per_second: _Optional[float] = ..., disk_load_bytes_per_second: _Optional[float] = ..., ram_load_bytes_per_second: _Optional[float] = ..., decode_tokens_per_second: _Optional[float] = ..., prefill_fixed_seconds: _Optional[float] = ..., prefill_linear_seconds_per_token: _Optional[float] = ..., prefill_quadratic_seconds_per_token2: _Optional[float] = ..., disk_cold_bytes_per_second: _Optional[float] = ..., disk_warm_bytes_per_second: _Optional[float] = ...) -> None: ...

class StoreEvent(_message.Message):
    __slots__ = ("action", "kind", "tokens", "bytes", "seconds", "reason")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action: str
    kind: str
    tokens: int
    bytes: int
    seconds: float
    reason: str
    def __init__(self, action: _Optional[str] = ..., kind: _Optional[str] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("finish_reason", "usage", "store_events", "rates", "live_id")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STORE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    LIVE_ID_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    usage: Usage
    store_events: _containers.RepeatedCompositeFieldContainer[StoreEvent]
    rates: Rates
    live_id: int
    def __init__(self, finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., store_events: _Optional[_Iterable[_Union[StoreEvent, _Mapping]]] = ..., rates: _Optional[_Union[Rates, _Mapping]] = ..., live_id: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TokenDelta
    final: Final
    def __init__(self, delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("chat_template",)
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    chat_template: str
    def __init__(self, chat_template: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "identity", "tokenizer_json", "chat_template", "eos_token_ids", "bos_token_id", "context_length", "reuse", "tool_parser")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    TOOL_PARSER_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    identity: str
    tokenizer_json: str
    chat_template: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token_id: int
    context_length: int
    reuse: ReuseRules
    tool_parser: str
    def __init__(self, model_name: _Optional[str] = ..., identity: _Optional[str] = ..., tokenizer_json: _Optional[str] = ..., chat_template: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token_id: _Optional[int] = ..., context_length: _Optional[int] = ..., reuse: _Optional[_Union[ReuseRules, _Mapping]] = ..., tool_parser: _Optional[str] = ...) -> None: ...

class ReuseRules(_message.Message):
    __slots__ = ("whole_only", "cut_below_tokens")
    WHOLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    CUT_BELOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    whole_only: bool
    cut_below_tokens: int
    def __init__(self, whole_only: _Optional[bool] = ..., cut_below_tokens: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("include_live_states",)
    INCLUDE_LIVE_STATES_FIELD_NUMBER: _ClassVar[int]
    include_live_states: bool
    def __init__(self, include_live_states: _Optional[bool] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("model_name", "queue_depth", "pid", "rates", "ram_entry_ids", "ram_bytes", "store_id", "max_queue", "event_seq", "live_states", "decode_concurrency", "prompt_concurrency", "progress", "store_budget_bytes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    RAM_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIVE_STATES_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    queue_depth: int
    pid: int
    rates: Rates
    ram_entry_ids: _containers.RepeatedScalarFieldContainer[str]
    ram_bytes: int
    store_id: str
    max_queue: int
    event_seq: int
    live_states: _containers.RepeatedCompositeFieldContainer[LiveState]
    decode_concurrency: int
    prompt_concurrency: int
    progress: int
    store_budget_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., queue_depth: _Optional[int] = ..., pid: _Optional[int] = ..., rates: _Optional[_Union[Rates, _Mapping]] = ..., ram_entry_ids: _Optional[_Iterable[str]] = ..., ram_bytes: _Optional[int] = ..., store_id: _Optional[str] = ..., max_queue: _Optional[int] = ..., event_seq: _Optional[int] = ..., live_states: _Optional[_Iterable[_Union[LiveState, _Mapping]]] = ..., decode_concurrency: _Optional[int] = ..., prompt_concurrency: _Optional[int] = ..., progress: _Optional[int] = ..., store_budget_bytes: _Optional[int] = ...) -> None: ...

class CacheEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LiveStateChanged(_message.Message):
    __slots__ = ("namespace", "token_ids", "live_id", "removed")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    live_id: int
    removed: bool
    def __init__(self, namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., live_id: _Optional[int] = ..., removed: _Optional[bool] = ...) -> None: ...

class LiveState(_message.Message):
    __slots__ = ("live_id", "namespace", "token_ids")
    LIVE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    live_id: int
    namespace: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, live_id: _Optional[int] = ..., namespace: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RamTierChanged(_message.Message):
    __slots__ = ("entry_id", "added")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    added: bool
    def __init__(self, entry_id: _Optional[str] = ..., added: _Optional[bool] = ...) -> None: ...

class CheckpointChanged(_message.Message):
    __slots__ = ("entry_id", "added", "namespace", "model_identity", "kind", "token_ids", "n_tokens", "payload_bytes", "reason")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    added: bool
    namespace: str
    model_identity: str
    kind: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    n_tokens: int
    payload_bytes: int
    reason: str
    def __init__(self, entry_id: _Optional[str] = ..., added: _Optional[bool] = ..., namespace: _Optional[str] = ..., model_identity: _Optional[str] = ..., kind: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., n_tokens: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheEvent(_message.Message):
    __slots__ = ("seq", "live", "ram", "checkpoint")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    RAM_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    live: LiveStateChanged
    ram: RamTierChanged
    checkpoint: CheckpointChanged
    def __init__(self, seq: _Optional[int] = ..., live: _Optional[_Union[LiveStateChanged, _Mapping]] = ..., ram: _Optional[_Union[RamTierChanged, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointChanged, _Mapping]] = ...) -> None: ...
