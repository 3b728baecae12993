"""ntcov: Price's equation for neural networks.

For any property ``x(w)`` of a network, gradient flow on a loss ``L`` gives
``dx/dt = ntcov(x, U)`` with ``U = −L`` and the neural tangent covariance
``ntcov(a, b) = ∇_w a · ∇_w b``.
"""

from ntcov import properties
from ntcov._autodiff import FallbackWarning
from ntcov.attribution import (
    Contributions,
    StepAttribution,
    TopK,
    TrainingAttribution,
    attribute,
)
from ntcov.covariance import Strategy, ntcov, ntvar, rate
from ntcov.forecast import Forecast, actual_trajectory, forecast, forecast_error, forecast_horizon
from ntcov.metric import OptimizerStep, optimizer_step
from ntcov.monitor import Monitor, UpdateSource
from ntcov.predict import ApproximationWarning, Sampling, StepPrediction, predict_step
from ntcov.property import Property
from ntcov.sketch import Sketch, sketch_ntcov

__version__ = "0.1.0"

__all__ = [
    "ApproximationWarning",
    "Contributions",
    "FallbackWarning",
    "Forecast",
    "Monitor",
    "OptimizerStep",
    "Property",
    "Sampling",
    "Sketch",
    "StepAttribution",
    "StepPrediction",
    "Strategy",
    "TopK",
    "TrainingAttribution",
    "UpdateSource",
    "__version__",
    "actual_trajectory",
    "attribute",
    "forecast",
    "forecast_error",
    "forecast_horizon",
    "ntcov",
    "ntvar",
    "optimizer_step",
    "predict_step",
    "properties",
    "rate",
    "sketch_ntcov",
]
