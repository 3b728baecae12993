"""ntcov: Price's equation for neural networks.

For any property ``x(w)`` of a network, gradient flow on a loss ``L`` gives
``dx/dt = ntcov(x, U)`` with ``U = −L`` and the neural tangent covariance
``ntcov(a, b) = ∇_w a · ∇_w b``.
"""

from ntcov import properties
from ntcov._autodiff import FallbackWarning
from ntcov.covariance import Strategy, ntcov, ntvar, rate
from ntcov.property import Property

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "Property",
    "Strategy",
    "__version__",
    "ntcov",
    "ntvar",
    "properties",
    "rate",
]
