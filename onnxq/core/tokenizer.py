"""The tokenizer beside an exported model, read from its ``tokenizer.json`` with the `tokenizers` library.

The commands that run a finished model (eval, validate, generate) need only this, not transformers, so
that a laptop runs them without torch. It answers the calls onnxq makes of a Hugging Face tokenizer with
the same token ids, since both apply the same ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onnxq.core.errors import OnnxqError

#: what transformers' ``clean_up_tokenization`` undoes after decoding, where a config asks for it
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class FileTokenizer:
    """``tok(text)["input_ids"]``, ``tok.decode(ids)``, ``bos_token_id`` and ``eos_token_id`` of a folder."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the library raises its own untyped errors
            raise OnnxqError(
                f"{folder / 'tokenizer.json'} cannot be read ({exc})".splitlines()[0],
                "export the model again with `onnxq export`, or pass --tokenizer MODEL",
            ) from None
        config_path = folder / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OnnxqError(
                f"{config_path} is not valid JSON", "export the model again with `onnxq export`, or delete the file"
            ) from None
        if not isinstance(config, dict):
            raise OnnxqError(f"{config_path} is not a tokenizer config", "export the model again with `onnxq export`")
        self.bos_token_id = self._token_id(config.get("bos_token"))
        self.eos_token_id = self._token_id(config.get("eos_token"))
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # older configs write an AddedToken
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for spaced, joined in _CLEANUP:
                text = text.replace(spaced, joined)
        return text
