from radixlm.sampling.batch_info import SamplingBatchInfo
from radixlm.sampling.params import SamplingParams
from radixlm.sampling.sampler import Sampler

__all__ = ["Sampler", "SamplingBatchInfo", "SamplingParams"]
