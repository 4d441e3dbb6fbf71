"""pool-managerd: the llorch-kit GPU node agent."""

__version__ = "0.1.0"
