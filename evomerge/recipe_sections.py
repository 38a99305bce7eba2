"""The recipe's optional sections: ``tokenizer:`` (which vocabulary the output has, and how the
embedding / output-head rows of sources with other vocabularies are realigned to it) and
``calibration:`` (the data the data-aware methods, RegMean and Fisher merging, compute their
statistics on). Strict pydantic models; :mod:`evomerge.recipe` embeds them.

``tokenizer:`` is a model reference (shorthand for ``{source: <ref>}``) or a mapping::

    tokenizer:
      source: base            # base | union | <model reference>; omitted: the base's (else the first
                              # source's) tokenizer, and every model must have the same vocabulary
      tokens:                 # per-token embedding rules (needs a source); listed tokens the
        "<|im_start|>":       # output vocabulary lacks are added to it
          source: path/to/chat-model                    # that model's row for this token
        "<|im_end|>":
          source: {kind: model_token, model: path/to/chat-model, token: "</s>"}   # or token_id: 2
          force: true         # every model takes this row, even those that have the token
        "<tool>": {source: {kind: zero}}
      pad_to_multiple_of: 64  # output rows padded (each padding row: the model's mean row)
      chat_template: chatml   # chatml | llama3 | alpaca | mistral | exaone | auto | a Jinja string

With a ``source`` the embedding and head rows of every model are looked up by token string
(:mod:`evomerge.vocab`, mergekit's rules for tokens a model lacks); without one, models whose
vocabularies differ are refused (never a row-by-row merge of different tokens).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, field_validator, model_validator

# methods that compute statistics on calibration data, and the statistic each needs
CALIBRATED_METHODS = {"regmean": "gram", "fisher": "fisher"}
TOKENIZER_KEYWORDS = ("base", "union")
# tags of the tagged unions below, dropped from error locations
UNION_TAGS = ("<ref>", "<block>", "<zero>", "<model_token>")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroSource(_Strict):
    """``{kind: zero}``: a row of zeros."""

    kind: Literal["zero"]


class ModelTokenSource(_Strict):
    """``{kind: model_token, model, token | token_id}``: row ``token_id`` (or the row of ``token``)
    of ``model``'s own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenSource":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` (a token string) and `token_id` (a row of the model)")
        return self


def _source_tag(v: Any) -> str | None:
    if isinstance(v, str):
        return "<ref>"
    if isinstance(v, dict):
        return {"zero": "<zero>", "model_token": "<model_token>"}.get(v.get("kind"))
    if isinstance(v, (ZeroSource, ModelTokenSource)):
        return "<zero>" if isinstance(v, ZeroSource) else "<model_token>"
    return None


TokenSource = Annotated[Union[Annotated[str, Tag("<ref>")], Annotated[ZeroSource, Tag("<zero>")],
                              Annotated[ModelTokenSource, Tag("<model_token>")]],
                        Discriminator(_source_tag, custom_error_type="token_source",
                                      custom_error_message="expected a model reference, {kind: zero} or "
                                                           "{kind: model_token, model: ..., token: ...}")]


class TokenSpec(_Strict):
    """Where one token's row comes from. ``source`` omitted: mergekit's default rule (a model's own
    row where it has the token; else the only model that has it, the base, the mean of those that
    have it, or zeros). ``force``: every model takes the ``source`` row, even where it has the token."""

    source: TokenSource | None = None
    force: StrictBool = False

    @model_validator(mode="after")
    def _forced(self) -> "TokenSpec":
        if self.force and self.source is None:
            raise ValueError("`force: true` needs a `source` (the row every model takes)")
        return self


class TokenizerSpec(_Strict):
    """The ``tokenizer:`` section (see the module docstring)."""

    source: str | None = None
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    chat_template: str | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty tokenizer source; use base, union or a model reference")
        return v

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: dict[str, TokenSpec]) -> dict[str, TokenSpec]:
        if any(not k for k in v):
            raise ValueError("an empty token string cannot be a vocabulary entry")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from evomerge.chat_templates import check_template

        check_template(v)  # ValueError naming what is wrong
        return v

    @model_validator(mode="after")
    def _needs_source(self) -> "TokenizerSpec":
        if self.source is None and (self.tokens or self.pad_to_multiple_of):
            raise ValueError("`tokens` and `pad_to_multiple_of` need a tokenizer `source` (base, union or a "
                             "model) to build the output vocabulary from")
        return self

    @property
    def realigns(self) -> bool:
        """Whether rows are matched by token string (a source is given)."""
        return self.source is not None


def _tokenizer_tag(v: Any) -> str:
    return "<ref>" if isinstance(v, str) else "<block>"


TokenizerField = Annotated[Union[Annotated[str, Tag("<ref>")], Annotated[TokenizerSpec, Tag("<block>")]],
                           Discriminator(_tokenizer_tag)]


class CalibrationSpec(_Strict):
    """The ``calibration:`` section of a data-aware recipe (RegMean, Fisher merging)::

        calibration: {suite: evals/zoo_demo.yaml, split: search, limit: 32}
        calibration: {jsonl: data/prompts.jsonl, field: prompt, limit: 200}

    * ``suite`` + ``split`` (default ``search``): every task's items of that split, each as its
      prompt followed by its gold continuation (a generate task's first answer, a multiple-choice
      task's correct choice, a loglik task's target);
    * ``jsonl`` + ``field`` (default ``prompt``): that string field of every line;
    * ``limit``: at most this many texts per task (suite) or in all (JSONL), in file order;
    * ``max_length``: tokens per text (longer texts are cut), default 512;
    * ``labels`` (Fisher only): ``sampled`` (default; each position's label drawn from the model's
      own prediction: the true Fisher) or ``data`` (the text's next tokens: the empirical Fisher);
    * ``seed``: the sampling seed of ``labels: sampled``.
    """

    suite: str | None = None
    split: Literal["search", "held-out"] | None = None   # suite only; default search
    jsonl: str | None = None
    field: str | None = None                             # jsonl only; default prompt
    limit: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=512, ge=2)
    labels: Literal["sampled", "data"] | None = None     # fisher only; default sampled
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "CalibrationSpec":
        if (self.suite is None) == (self.jsonl is None):
            raise ValueError("give exactly one of `suite` (a task suite YAML) and `jsonl` (a JSONL file of texts)")
        if self.suite is not None and self.field is not None:
            raise ValueError("`field` names the text field of a `jsonl` file; a suite's texts are its items")
        if self.jsonl is not None and self.split is not None:
            raise ValueError("`split` selects a suite's split; a `jsonl` file has none")
        return self

    @property
    def split_name(self) -> str:
        return self.split or "search"

    @property
    def field_name(self) -> str:
        return self.field or "prompt"

    @property
    def label_kind(self) -> str:
        return self.labels or "sampled"
