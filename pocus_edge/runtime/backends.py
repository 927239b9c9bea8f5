"""The backends now live in :mod:`pocus_edge.inference`; this module keeps the names that
scripts import from ``pocus_edge.runtime.backends`` working. New code imports
``pocus_edge.inference``."""

from ..inference import *  # noqa: F401,F403
from ..inference import __all__  # noqa: F401
