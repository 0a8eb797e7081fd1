//! Reading and writing record files: JSONL, JSON arrays and Parquet in; JSONL out, written
//! atomically ([`atomic::AtomicFile`]) or appended record by record ([`journal::Journal`]).

pub mod atomic;
pub mod journal;
pub mod read;

pub use atomic::AtomicFile;
pub use journal::Journal;
pub use read::{RecordReader, read_records};
