"""medkd: distil frozen vision foundation models into small CNNs for MedMNIST via a teacher-logit cache."""

from medkd.errors import MedkdError

__version__ = "0.1.0"
__all__ = ["MedkdError", "__version__"]
