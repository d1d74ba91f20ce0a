# A package from here on; the code moves out of _grad into modules by layer in the next commit.
from funcgrad.verify._grad import *  # noqa: F403
from funcgrad.verify._grad import __all__, __doc__, _combine_verdicts  # noqa: F401
