//! Final-answer extraction and mathematical equivalence for model responses.
