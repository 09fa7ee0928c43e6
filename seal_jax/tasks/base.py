"""The domain protocol moved to `seal_jax.domain` (the engine side); this name stays for old imports."""
from seal_jax.domain import (CandidateFailure, CandidateSpec, Domain, EvalJob, EvalRequest,  # noqa: F401
                             Score)
