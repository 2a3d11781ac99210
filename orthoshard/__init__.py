"""orthoshard: orthogonalizing and eigenbasis optimizers for sharded training.

The four parts live at the repository root: ``optim`` (the math, pure torch), ``sharding``
(torch.distributed), ``service`` (the torch-free sidecar) and ``deploy``. This package holds the
console script and the trainer-side glue that joins them.
"""

__version__ = "0.1.0"
