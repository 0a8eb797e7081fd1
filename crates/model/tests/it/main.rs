//! Integration tests of retort-model: one binary (parity with the PyTorch fixtures, training).

mod bf16;
mod engine;
mod parity;
mod train;
