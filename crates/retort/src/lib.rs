//! The reasoning-distillation pipeline as a library: records and IO ([`records`], [`io`]),
//! backends ([`backend::Backend`]), manifests, and one module per stage.

pub mod backend;
pub mod bench;
pub mod check;
pub mod compute;
pub mod demo;
pub mod device_check;
pub mod distill;
pub mod error;
pub mod eval;
pub mod generate;
pub mod identity;
pub mod interrupt;
pub mod io;
pub mod manifest;
#[cfg(feature = "test-util")]
pub mod mock_scoring;
#[cfg(feature = "test-util")]
pub mod mock_server;
pub mod model_spec;
pub mod provenance;
pub mod reasoning;
pub mod records;
pub mod report;
pub mod score;
pub mod select;
pub mod verify;
pub mod world;

pub use error::{Error, Result};
pub use model_spec::ModelSpec;
