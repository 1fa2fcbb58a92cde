"""HTTP serving: OpenAI-compatible and SGLang-native APIs over the engine."""
