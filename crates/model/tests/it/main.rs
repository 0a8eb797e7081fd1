//! Integration tests of retort-model: one binary (parity with the PyTorch fixtures, training).

mod engine;
mod parity;
mod train;
