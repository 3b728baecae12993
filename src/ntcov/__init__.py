"""ntcov: Price's equation for neural networks.

For any property ``x(w)`` of a network, gradient flow on a loss ``L`` gives
``dx/dt = ntcov(x, U)`` with ``U = −L`` and the neural tangent covariance
``ntcov(a, b) = ∇_w a · ∇_w b``.
"""

from ntcov import properties
from ntcov._autodiff import FallbackWarning
from ntcov.covariance import Strategy, ntcov, ntvar, rate
from ntcov.forecast import Forecast, actual_trajectory, forecast, forecast_error, forecast_horizon
from ntcov.property import Property

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "Forecast",
    "Property",
    "Strategy",
    "__version__",
    "actual_trajectory",
    "forecast",
    "forecast_error",
    "forecast_horizon",
    "ntcov",
    "ntvar",
    "properties",
    "rate",
]

from ntcov.metric import OptimizerStep, optimizer_step
from ntcov.predict import Sampling, StepPrediction, predict_step

__all__ += ["OptimizerStep", "Sampling", "StepPrediction", "optimizer_step", "predict_step"]

from ntcov.monitor import Monitor, UpdateSource

__all__ += ["Monitor", "UpdateSource"]
