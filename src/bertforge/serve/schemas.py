"""Request and response bodies of the HTTP API (pydantic), which FastAPI turns into the /docs schema.

`model` is optional everywhere: without it a request goes to the first model served. Every request
model forbids unknown fields, so a misspelt option is a 422 naming it rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TextOrTexts = str | list[str]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="a served model's name (default: the first one)")


# ----------------------------------------------------------------------------- embeddings

class EmbeddingsRequest(Request):
    model_config = ConfigDict(extra="allow", protected_namespaces=())  # OpenAI clients may add fields (user, ...)

    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a text, texts, or token ids as /tokenize returns them (with [CLS]/[SEP])")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes (the openai client's default)")
    dimensions: int | None = Field(None, ge=1, description="keep the first N coordinates and re-normalise")
    truncate: bool = Field(True, description="cut texts longer than the model's max length (false: 422)")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
    truncated: int = Field(0, description="how many inputs were cut to the model's max length")


# ----------------------------------------------------------------------------- similarity / rerank

class SimilarityRequest(Request):
    source_sentence: str = Field(..., description="the text to compare against")
    sentences: list[str] = Field(..., description="candidate texts")
    truncate: bool = True


class Ranked(BaseModel):
    index: int
    score: float
    text: str | None = None


class SimilarityResponse(BaseModel):
    model: str
    scores: list[float] = Field(..., description="cosine similarity per candidate, in input order")
    ranking: list[Ranked] = Field(..., description="candidates, most similar first")
    usage: Usage
    truncated: int = 0


class RerankRequest(Request):
    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="logits instead of sigmoid scores")
    return_text: bool = False
    truncate: bool = True


class RerankResponse(BaseModel):
    model: str
    results: list[Ranked]
    truncated: int = 0


# ----------------------------------------------------------------------------- tasks

class FillMaskRequest(Request):
    inputs: TextOrTexts = Field(..., description="text(s) with one or more mask tokens, e.g. [MASK]")
    top_k: int = Field(5, ge=1, le=100)


class Prediction(BaseModel):
    token: str
    token_id: int
    score: float


class FillMaskResponse(BaseModel):
    model: str
    predictions: list[list[list[Prediction]]] = Field(..., description="per text, per mask, top_k predictions")


class ClassifyRequest(Request):
    inputs: str | list[str] | list[list[str]] = Field(..., description="texts, or [text, text] pairs")
    truncate: bool = True


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    label: str | None = None
    score: float
    scores: list[LabelScore] | None = None


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classification]
    truncated: int = 0


class QARequest(Request):
    question: str
    context: str


class QAResponse(BaseModel):
    model: str
    answer: str
    start: int = Field(..., description="character offset of the answer in the context")
    end: int
    score: float = Field(..., description="p(start) x p(end) in the best window")
    windows: int


class TokenizeRequest(Request):
    inputs: TextOrTexts
    pairs: list[str] | None = None


class InspectRequest(Request):
    text: str
    mask_rate: float = Field(0.15, gt=0, le=1)
    seed: int = 0
    top_k: int = Field(5, ge=1, le=20)
