"""The front end: the offline Engine, its scheduler processes and request-side detokenization."""
