"""tuneloop: from a file of labelled examples to an evaluated, exported and served fine-tune.

Public API: each stage's ``run(config) -> Result``::

    from tuneloop import load_config, train, evaluate
    config = load_config("examples/support-triage/config.yaml")
    train.run(config)
    evaluate.run(config)
"""

from tuneloop.config import ConfigError, RunConfig, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "__version__", "load_config"]
