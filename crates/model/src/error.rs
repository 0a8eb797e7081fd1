//! The crate's error type.

/// Errors from loading, running, training and saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model folder or file is missing or malformed.
    #[error("{0}")]
    Model(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
