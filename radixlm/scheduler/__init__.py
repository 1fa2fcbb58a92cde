from radixlm.scheduler.scheduler import Scheduler, run_to_completion

__all__ = ["Scheduler", "run_to_completion"]
