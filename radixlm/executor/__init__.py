from radixlm.executor.model_runner import ModelRunner
from radixlm.executor.worker import ModelWorker

__all__ = ["ModelRunner", "ModelWorker"]
