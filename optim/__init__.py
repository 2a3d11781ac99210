"""orthoshard.optim: the math. Pure torch; never imports torch.distributed or the service.

- :func:`orthogonalize` (Newton-Schulz polar factors with Soft-Muon softening),
- the optimizers :class:`Muon`, :class:`NorMuon`, :class:`SOAP` and the routing helper
  :func:`split_param_groups` (with its name fragments, ``DEFAULT_ADAMW_NAME_PARTS``),
- :mod:`optim.health` (orthogonality error, eigengap, basis rotation),
- :mod:`optim.orthogonal` (OFT rotations), :mod:`optim.stiefel` (Stiefel tools) and
  :mod:`optim.oft` (an OFT adapter for ``nn.Linear``).
"""

from optim import health, oft, orthogonal, stiefel
from optim._matmul import count_matmuls
from optim.muon import Muon
from optim.normuon import NorMuon
from optim.orthogonalize import orthogonalize
from optim.params import DEFAULT_ADAMW_NAME_PARTS, split_param_groups
from optim.soap import SOAP

__all__ = ["DEFAULT_ADAMW_NAME_PARTS", "SOAP", "Muon", "NorMuon", "count_matmuls", "health", "oft",
           "orthogonal", "orthogonalize", "split_param_groups", "stiefel"]
