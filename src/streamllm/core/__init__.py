"""The core: which tokens a cache keeps (``policy``), where they are rotated (``rotary``), the plan for the next
tokens (``plan``) and the storage that carries it out (``cache``). No model, no transformers."""
