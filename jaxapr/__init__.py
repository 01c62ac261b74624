"""jaxapr: Adaptive Parallel Reasoning in JAX.

The environments live in the sibling package ``envs`` (importable on its own); the APR
system (trace language, tokenizer, policy, engine, runtime, training) grows here.

``jaxapr.load_policy(path)`` loads a policy from an exported ``.npz`` (such as the shipped
``experiments/checkpoints/*.npz``), a training run's work directory (``jaxapr.policy_io``) or a
Hugging Face Llama directory (``jaxapr.hf``).
"""

__version__ = "0.1.0"
__all__ = ["load_policy"]


def __getattr__(name):
    # Imported on first use: ``import jaxapr.tokenizer`` and friends stay free of JAX start-up.
    if name == "load_policy":
        from jaxapr.policy_io import load_policy

        return load_policy
    raise AttributeError(f"module 'jaxapr' has no attribute {name!r}")
