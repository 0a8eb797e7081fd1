//! Parity with the PyTorch/transformers fixtures in `shared/fixtures`.
