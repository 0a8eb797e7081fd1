//! Causal language models from Hugging Face folders on candle.

pub mod error;
pub mod train;

pub use error::{Error, Result};
