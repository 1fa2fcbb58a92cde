"""Constrained (structured) generation: grammars compiled off the critical path, token masks at sampling."""

from radixlm.constrained.xgrammar_backend import (
    GrammarBackend,
    GrammarSpec,
    TokenBitmask,
    accept_token,
    apply_token_bitmask,
    check_grammar,
    fill_token_bitmask,
    new_matcher,
    warm_up_grammar_masks,
)

__all__ = ["GrammarBackend", "GrammarSpec", "TokenBitmask", "accept_token", "apply_token_bitmask", "check_grammar",
           "fill_token_bitmask", "new_matcher", "warm_up_grammar_masks"]
