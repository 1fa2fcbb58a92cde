from radixlm.config.model_config import ModelConfig
from radixlm.config.server_args import ServerArgs

__all__ = ["ModelConfig", "ServerArgs"]
