"""bloom-runtime: hands LLM tasks to worker nodes under leases, durably and audited."""

__version__ = "0.1.0"
