"""Sample-site names of :class:`pyromoe.MixtureOfExperts`; they are also the ArviZ variable names.

========================  =================  ==========================================
site                      shape              meaning
========================  =================  ==========================================
``experts.weight``        (k, d)             expert weights ``a_i``
``experts.bias``          (k,)               expert intercepts ``b_i`` (``bias=True``)
``gate.weight``           (k - 1, d)         gate weights (expert 0 is the reference)
``gate.bias``             (k - 1,)           gate offsets (``bias=True``)
``noise``                 ()                 shared noise standard deviation ``sigma``
``y``                     (n,)               the observed outputs
========================  =================  ==========================================
"""

EXPERTS_WEIGHT = "experts.weight"
EXPERTS_BIAS = "experts.bias"
GATE_WEIGHT = "gate.weight"
GATE_BIAS = "gate.bias"
NOISE = "noise"
OBS = "y"
OBS_PLATE = "obs"

PARAMETER_SITES = (EXPERTS_WEIGHT, EXPERTS_BIAS, GATE_WEIGHT, GATE_BIAS, NOISE)

#: The expert links by name, in the order of :data:`pyromoe.core.links.LINKS` (which maps each name to
#: its :class:`~pyromoe.core.links.Link`). Kept here, free of torch, so that the command line can
#: list them without importing torch.
LINK_NAMES = ("linear", "tanh", "relu", "leaky_relu", "sigmoid")
