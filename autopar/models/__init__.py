"""Models written as serial Cells: PanGu-α (the reference model) and Yuan 2.0.

Importing this package registers each family with the planner
(``autopar.strategy.pipeline.registry``), which is how ``python -m autopar.plan --model``
finds them."""
from . import pangu_alpha, yuan

__all__ = ["pangu_alpha", "yuan"]
