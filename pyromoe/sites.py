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
