from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RewardModelSpec(_message.Message):
    __slots__ = ("name", "endpoint", "checkpoint_dir", "weight", "timeout_s", "batch_size", "tls_ca_pem", "max_attempts", "failure_threshold", "cooldown_s", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TLS_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoint: str
    checkpoint_dir: str
    weight: float
    timeout_s: float
    batch_size: int
    tls_ca_pem: bytes
    max_attempts: int
    failure_threshold: int
    cooldown_s: float
    token: str
    def __init__(self, name: _Optional[str] = ..., endpoint: _Optional[str] = ..., checkpoint_dir: _Optional[str] = ..., weight: _Optional[float] = ..., timeout_s: _Optional[float] = ..., batch_size: _Optional[int] = ..., tls_ca_pem: _Optional[bytes] = ..., max_attempts: _Optional[int] = ..., failure_threshold: _Optional[int] = ..., cooldown_s: _Optional[float] = ..., token: _Optional[str] = ...) -> None: ...

class RewardModelInfo(_message.Message):
    __slots__ = ("spec", "healthy", "scored", "failed", "reward_mean", "last_error", "disabled", "disabled_reason")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_REASON_FIELD_NUMBER: _ClassVar[int]
    spec: RewardModelSpec
    healthy: bool
    scored: int
    failed: int
    reward_mean: float
    last_error: str
    disabled: bool
    disabled_reason: str
    def __init__(self, spec: _Optional[_Union[RewardModelSpec, _Mapping]] = ..., healthy: _Optional[bool] = ..., scored: _Optional[int] = ..., failed: _Optional[int] = ..., reward_mean: _Optional[float] = ..., last_error: _Optional[str] = ..., disabled: _Optional[bool] = ..., disabled_reason: _Optional[str] = ...) -> None: ...

class EnvironmentSpec(_message.Message):
    __slots__ = ("name", "endpoint", "timeout_s", "max_attempts", "failure_threshold", "cooldown_s", "tls_ca_pem", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    TLS_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoint: str
    timeout_s: float
    max_attempts: int
    failure_threshold: int
    cooldown_s: float
    tls_ca_pem: bytes
    token: str
    def __init__(self, name: _Optional[str] = ..., endpoint: _Optional[str] = ..., timeout_s: _Optional[float] = ..., max_attempts: _Optional[int] = ..., failure_threshold: _Optional[int] = ..., cooldown_s: _Optional[float] = ..., tls_ca_pem: _Optional[bytes] = ..., token: _Optional[str] = ...) -> None: ...

class EnvironmentInfo(_message.Message):
    __slots__ = ("spec", "stop")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    spec: EnvironmentSpec
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spec: _Optional[_Union[EnvironmentSpec, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterEnvironmentRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: EnvironmentSpec
    def __init__(self, spec: _Optional[_Union[EnvironmentSpec, _Mapping]] = ...) -> None: ...

class RegisterEnvironmentResponse(_message.Message):
    __slots__ = ("env",)
    ENV_FIELD_NUMBER: _ClassVar[int]
    env: EnvironmentInfo
    def __init__(self, env: _Optional[_Union[EnvironmentInfo, _Mapping]] = ...) -> None: ...

class RemoveEnvironmentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveEnvironmentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnvironmentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnvironmentsResponse(_message.Message):
    __slots__ = ("envs",)
    ENVS_FIELD_NUMBER: _ClassVar[int]
    envs: _containers.RepeatedCompositeFieldContainer[EnvironmentInfo]
    def __init__(self, envs: _Optional[_Iterable[_Union[EnvironmentInfo, _Mapping]]] = ...) -> None: ...

class RegisterRewardModelRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RewardModelSpec
    def __init__(self, spec: _Optional[_Union[RewardModelSpec, _Mapping]] = ...) -> None: ...

class RegisterRewardModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: RewardModelInfo
    def __init__(self, model: _Optional[_Union[RewardModelInfo, _Mapping]] = ...) -> None: ...

class RemoveRewardModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveRewardModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRewardModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRewardModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RewardModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[RewardModelInfo, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScaleRolloutRequest(_message.Message):
    __slots__ = ("num_workers",)
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    num_workers: int
    def __init__(self, num_workers: _Optional[int] = ...) -> None: ...

class ScaleRolloutResponse(_message.Message):
    __slots__ = ("previous", "target")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    previous: int
    target: int
    def __init__(self, previous: _Optional[int] = ..., target: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("step", "policy_version", "samples_per_s", "rollout_workers", "reward_workers", "reward_means", "produced", "trained", "dropped", "dropped_by_reason", "paused", "events", "data", "last_eval")
    class RewardMeansEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DroppedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REWARD_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEANS_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    samples_per_s: float
    rollout_workers: int
    reward_workers: int
    reward_means: _containers.ScalarMap[str, float]
    produced: int
    trained: int
    dropped: int
    dropped_by_reason: _containers.ScalarMap[str, int]
    paused: str
    events: _containers.RepeatedScalarFieldContainer[str]
    data: DataProgress
    last_eval: EvalSummary
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., samples_per_s: _Optional[float] = ..., rollout_workers: _Optional[int] = ..., reward_workers: _Optional[int] = ..., reward_means: _Optional[_Mapping[str, float]] = ..., produced: _Optional[int] = ..., trained: _Optional[int] = ..., dropped: _Optional[int] = ..., dropped_by_reason: _Optional[_Mapping[str, int]] = ..., paused: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ..., data: _Optional[_Union[DataProgress, _Mapping]] = ..., last_eval: _Optional[_Union[EvalSummary, _Mapping]] = ...) -> None: ...

class DataProgress(_message.Message):
    __slots__ = ("epoch", "position", "size", "epochs")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    position: int
    size: int
    epochs: int
    def __init__(self, epoch: _Optional[int] = ..., position: _Optional[int] = ..., size: _Optional[int] = ..., epochs: _Optional[int] = ...) -> None: ...

class EvalSummary(_message.Message):
    __slots__ = ("step", "policy_version", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...
