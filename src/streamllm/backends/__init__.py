"""The backends that read the core's plans: the transformers adapter (``hf``, ``attention``, ``arch``), the
decode step in Python and C++ (``decode``, ``native``, ``quant``) and the step over several streams (``batched``)."""
