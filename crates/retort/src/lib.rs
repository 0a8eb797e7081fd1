//! The reasoning-distillation pipeline as a library: records and IO, backends
//! ([`backend::Backend`]), and one module per stage.

pub mod backend;
pub mod distill;
pub mod error;
pub mod mock_server;

pub use error::{Error, Result};
