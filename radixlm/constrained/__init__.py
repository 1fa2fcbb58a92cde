"""Constrained (structured) generation: grammars compiled off the critical path, token masks at sampling."""

from radixlm.constrained.xgrammar_backend import (
    GrammarBackend,
    GrammarSpec,
    accept_token,
    apply_grammar_masks,
    check_grammar,
    new_matcher,
    warm_up_grammar_masks,
)

__all__ = ["GrammarBackend", "GrammarSpec", "accept_token", "apply_grammar_masks", "check_grammar", "new_matcher",
           "warm_up_grammar_masks"]
