"""fl2t: continual, order-agnostic personalization of text-to-image diffusion models (FL2T)."""

from fl2t.errors import Fl2tError

__version__ = "0.1.0"
__all__ = ["Fl2tError"]
