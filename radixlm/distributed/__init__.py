from radixlm.distributed.parallel_state import (
    DPAttention,
    TPGroup,
    destroy_tensor_parallel,
    divide,
    free_local_addr,
    get_attn_tp_group,
    get_dp_attention,
    get_tp_group,
    init_tensor_parallel,
    layout_for_sizing,
    set_multi_gpu_env,
)

__all__ = ["DPAttention", "TPGroup", "destroy_tensor_parallel", "divide", "free_local_addr", "get_attn_tp_group",
           "get_dp_attention", "get_tp_group", "init_tensor_parallel", "layout_for_sizing", "set_multi_gpu_env"]
