from radixlm.distributed.parallel_state import (
    TPGroup,
    destroy_tensor_parallel,
    divide,
    free_local_addr,
    get_tp_group,
    init_tensor_parallel,
    set_multi_gpu_env,
)

__all__ = ["TPGroup", "destroy_tensor_parallel", "divide", "free_local_addr", "get_tp_group", "init_tensor_parallel",
           "set_multi_gpu_env"]
