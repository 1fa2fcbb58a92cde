"""Small helpers below every layer (host paths, toolchain, CPU features, host -> device copies); nothing here
imports another radixlm package."""
