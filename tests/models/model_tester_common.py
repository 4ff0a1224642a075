"""The model-tester helpers under their historical name: checks every model passes (`common_checks.py`) and the
causal-LM checks (`causal_lm_checks.py`). New tests import from those two modules."""

from causal_lm_checks import (  # noqa: F401
    check_batched_equals_single_with_padding,
    check_cache_matches_no_cache,
    check_tokenizer_padded_generation_equals_single,
)
from common_checks import (  # noqa: F401
    assert_close,
    auto_class_of,
    check_dtype,
    check_export,
    check_gradient_flow,
    check_save_load_round_trip,
)
