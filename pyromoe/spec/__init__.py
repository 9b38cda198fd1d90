"""The model specification: formulas (formulaic), factor levels, column names and standardisation.

:class:`~pyromoe.spec.formula.ModelSpecification` builds the experts' design ``x`` and the gate's
design ``z`` for any table, z-scored as the fitted data were. It reads tables (pandas) and formulas
(formulaic) and imports nothing of pyromoe but the core's arithmetic.
"""
