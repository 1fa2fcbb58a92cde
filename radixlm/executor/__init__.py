from radixlm.executor.model_runner import ModelRunner

__all__ = ["ModelRunner"]
