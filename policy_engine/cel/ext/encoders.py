"""cel-go's encoders library (``ext.Encoders``): ``base64.encode(bytes) -> string`` and
``base64.decode(string) -> bytes`` (standard alphabet; padding optional when decoding)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from policy_engine.cel.errors import CelEvaluationError
from policy_engine.cel.functions import Function, function, sig
from policy_engine.cel.types import BYTES, STRING
from policy_engine.cel.values import kind_of, no_overload


def base64_encode(value: Any) -> str:
    """``base64.encode(b)``: standard base64 with padding."""
    if kind_of(value) != "bytes":
        raise no_overload("base64.encode", value)
    return base64.b64encode(bytes(value)).decode("ascii")


def base64_decode(value: Any) -> bytes:
    """``base64.decode(s)``: the bytes of standard base64 text, padded or not (line breaks
    skipped); an error for anything else."""
    if kind_of(value) != "string":
        raise no_overload("base64.decode", value)
    # Go's decoder skips line breaks; unpadded text (RawStdEncoding) is padded here, and
    # text with some but not all of its padding is refused, as in cel-go.
    text = str(value).replace("\r", "").replace("\n", "")
    if "=" not in text:
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CelEvaluationError("base64.decode(): invalid base64 text") from None


FUNCTIONS: tuple[Function, ...] = (
    function("base64.encode", base64_encode, (1,), "global", (), (sig(BYTES, STRING),)),
    function("base64.decode", base64_decode, (1,), "global", (), (sig(STRING, BYTES),)),
)
