"""The KServe V2 / Open Inference Protocol messages (REST), as pydantic models.

Reference: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ and Triton's
binary tensor data extension (`binary_data_size`, `binary_data`, `binary_data_output` parameters).
Tensor `data` stays an untyped JSON value here: the codec turns it into numpy in one pass.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, Any]
# numpy 1 arrays hold at most 32 dimensions (numpy 2: 64); no served model needs more, and a rank past what
# numpy can build must be the client's mistake (400), never numpy's ValueError (500).
MAX_RANK = 32
# A dimension is a JSON integer: strict, so `true`, `"64"` and `64.0` are refused rather than coerced
# (negative ones are refused by the codec, with a message that says so).
Dimension = Annotated[int, Field(strict=True)]


class _Message(BaseModel):
    # Unknown fields are tolerated on requests, as the spec's extensions add fields; responses are ours.
    # Strict: JSON types are taken as sent (no "5" for 5, no 5 for "5", no true for 1).
    model_config = ConfigDict(extra="allow", strict=True)


class RequestInput(_Message):
    """One input tensor: `data` flat in row-major order or nested as `shape`, or its bytes in the body."""

    name: str
    shape: list[Dimension] = Field(max_length=MAX_RANK)
    datatype: str
    parameters: Parameters | None = None
    data: Any = None


class RequestOutput(_Message):
    """An output the client asks for; `parameters.binary_data` asks for it in the binary extension."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Message):
    """`POST /v2/models/{name}[/versions/{v}]/infer`."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    # Absent asks for every output; an empty list asks for none, which no model can answer.
    outputs: list[RequestOutput] | None = Field(default=None, min_length=1)


class MetadataTensor(BaseModel):
    """A model input or output: `shape` has -1 for each dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    """`GET /v2`."""

    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    """`GET /v2/models/{name}[/versions/{v}]`; `parameters` holds state, reason, providers, verification."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters
