"""From arrays to a point estimate: ``tensor_init``, ``initialize`` and ``simulate`` (torch only)."""
