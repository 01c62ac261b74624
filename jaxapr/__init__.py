"""jaxapr: Adaptive Parallel Reasoning in JAX.

The environments live in the sibling package ``envs`` (importable on its own); the APR
system (trace language, tokenizer, policy, engine, runtime, training) grows here.
"""
__version__ = "0.1.0"
