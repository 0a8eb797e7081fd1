//! The crate's error type: one enum, [`Error`], and the [`Result`] alias.

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
    /// A tokenizer could not be loaded or failed to encode or decode.
    #[error("{0}")]
    Tokenizer(String),
    /// A chat template could not be compiled or rendered.
    #[error("{0}")]
    Template(String),
    /// An argument is out of range or inconsistent (empty prompt, bad sampling parameter, ...).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A [`Error::Model`] from anything printable.
    pub fn model(msg: impl Into<String>) -> Self {
        Self::Model(msg.into())
    }

    /// A [`Error::Invalid`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
