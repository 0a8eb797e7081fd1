//! Token-level KD divergences.
