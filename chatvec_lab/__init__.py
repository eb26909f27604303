"""chatvec_lab: chat-vector arithmetic on language models (Huang et al., ACL 2024).

    from chatvec_lab import ChatVector, apply_vectors, toy
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    apply_vectors(toy.path("cp"), [(cv, 1.0)], out="cp-chat")
"""
from chatvec_lab.version import __version__

from chatvec_lab.errors import (ChatVecError, MismatchError, NonFiniteError, NotFound, OutputError, SourceError,
                                Unavailable, UnknownName, UsageError)
from chatvec_lab.io.sources import open_weights
from chatvec_lab.core.vector import ChatVector, extract, named_vectors
from chatvec_lab.core.apply import ApplyOptions, LineageWarning, apply_to_model, apply_vectors
from chatvec_lab.behaviour.harness import evaluate_harness
from chatvec_lab import toy
from chatvec_lab._moved import install as _install_moved_paths

_install_moved_paths()

__all__ = ["ChatVector", "extract", "named_vectors", "apply_vectors", "apply_to_model", "ApplyOptions", "LineageWarning",
           "open_weights", "toy", "ChatVecError", "MismatchError", "NonFiniteError", "NotFound", "OutputError",
           "SourceError", "Unavailable", "UnknownName", "UsageError", "evaluate_harness", "__version__"]
