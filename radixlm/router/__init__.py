"""The router (issue #21): routing policies over a shared prefix tree of the workers' request text; the router
process (HTTP, workers, health checks) builds on these."""

from radixlm.router.policy import (POLICIES, CacheAwarePolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy,
                                   RouterArgs, RoutingPolicy, make_policy)
from radixlm.router.prefix_tree import EvictStats, MatchResult, PrefixTree

__all__ = ["POLICIES", "CacheAwarePolicy", "EvictStats", "MatchResult", "PowerOfTwoPolicy", "PrefixTree",
           "RandomPolicy", "RoundRobinPolicy", "RouterArgs", "RoutingPolicy", "make_policy"]
