"""An ``Engine`` without a scheduler or a model, for in-process tests of the HTTP app: requests are validated by the
real ``RequestValidator`` over a tokenizer whose token ids are characters; nothing reaches a scheduler."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from radixlm.config import ServerArgs
from radixlm.engine.engine import Engine
from radixlm.engine.io_struct import SchedulerInfo
from radixlm.engine.lora_registry import LoRARegistry
from radixlm.engine.request_validator import RequestValidator
from radixlm.metrics import MetricsCollector

VOCAB = 100
CONTEXT_LENGTH = 64


class StubTokenizer:
    """Characters as token ids."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) % VOCAB for c in text])

    def __len__(self) -> int:
        return VOCAB

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return "".join(m["content"] for m in messages)


class StubEngine:
    """What the routes use of an Engine.  ``args``: ServerArgs fields (``api_key``, ``enable_metrics``, ...)."""

    prepare = Engine.prepare
    require_tokenizer = Engine.require_tokenizer
    check_prompt_chars = Engine.check_prompt_chars
    load_lora_adapter = Engine.load_lora_adapter  # nothing reaches a scheduler: refusals only
    unload_lora_adapter = Engine.unload_lora_adapter

    def __init__(self, **args: Any) -> None:
        self.server_args = ServerArgs(device="cpu", attention_backend="torch_native", random_seed=0, **args)
        self.model_name = self.model_path = "stub"
        self.metrics = MetricsCollector("stub") if self.server_args.enable_metrics else None
        self.tokenizer = StubTokenizer()
        self.info = SchedulerInfo(max_total_num_tokens=1024, max_running_requests=8, context_length=CONTEXT_LENGTH,
                                  vocab_size=VOCAB)
        self.validator = RequestValidator(self.tokenizer, self.info, self.server_args.grammar_backend)
        self.validator.max_prompt_chars = CONTEXT_LENGTH  # one character per token
        self.lora = LoRARegistry(self.server_args.enable_lora, self.server_args.lora_path_map())
        self._lock = threading.RLock()
        self._states: dict[str, Any] = {}

    def check_ready(self) -> None:
        pass

    def check_admitting(self) -> None:
        pass

    async def submit(self, *args: Any, **kwargs: Any) -> list:
        raise AssertionError("no scheduler behind this stub")
