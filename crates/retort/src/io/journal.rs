//! Append-only JSONL journals for long jobs: each record is written and flushed as it completes,
//! so a killed run keeps everything that finished. Reopening a journal drops a torn last line
//! (a record cut off by the kill) with a warning and returns the records already present.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// An append-only JSONL file, flushed after every record.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: fs_err::File,
}

/// What reopening a journal found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Complete records already in the file, in order.
    pub records: Vec<Map<String, Value>>,
    /// Whether a torn last line was dropped.
    pub dropped_torn_line: bool,
}

impl Journal {
    /// Opens `path` for appending, creating it if needed. Complete records already present are
    /// returned; a torn last line (no trailing newline, or not valid JSON) is truncated away.
    pub fn open(path: &Path) -> Result<(Self, Recovered)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs_err::create_dir_all(parent)?;
        }
        let mut recovered = Recovered::default();
        let mut keep_len = 0u64;
        if path.exists() {
            let bytes = fs_err::read(path)?;
            let mut offset = 0usize;
            let mut line_no = 0usize;
            while offset < bytes.len() {
                line_no += 1;
                let end = bytes[offset..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|i| offset + i);
                let (line, next) = match end {
                    Some(e) => (&bytes[offset..e], e + 1),
                    None => (&bytes[offset..], bytes.len()),
                };
                let parsed = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| serde_json::from_str::<Map<String, Value>>(s.trim()).ok());
                let is_last = next >= bytes.len();
                match parsed {
                    Some(record) if end.is_some() => {
                        recovered.records.push(record);
                        keep_len = next as u64;
                    }
                    _ if line.iter().all(u8::is_ascii_whitespace) && end.is_some() => {
                        keep_len = next as u64;
                    }
                    _ if is_last => {
                        tracing::warn!(
                            "{}:{line_no}: dropping a torn last line left by an interrupted run",
                            path.display()
                        );
                        recovered.dropped_torn_line = true;
                    }
                    _ => {
                        return Err(Error::Input {
                            path: path.to_path_buf(),
                            line: line_no,
                            message: "expected a JSON object on every line of an existing output"
                                .into(),
                        });
                    }
                }
                offset = next;
            }
        }
        let mut file = fs_err::OpenOptions::new()
            .create(true)
            .append(false)
            .write(true)
            .open(path)?;
        file.set_len(keep_len)?;
        file.seek(SeekFrom::End(0))?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            recovered,
        ))
    }

    /// Appends one record as a line and flushes it to the OS.
    pub fn append(&mut self, record: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()?;
        Ok(())
    }

    /// Forces the journal to disk.
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn torn_last_line_is_dropped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traces.jsonl");
        fs_err::write(&path, "{\"id\":1}\n{\"id\":2}\n{\"id\":3, \"resp").unwrap();
        let (mut journal, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.records.len(), 2);
        assert!(recovered.dropped_torn_line);
        journal.append(&json!({"id": 3})).unwrap();
        let text = fs_err::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"id\":1}\n{\"id\":2}\n{\"id\":3}\n");
    }

    #[test]
    fn corrupt_middle_line_is_an_error_with_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traces.jsonl");
        fs_err::write(&path, "{\"id\":1}\nnot json\n{\"id\":3}\n").unwrap();
        let err = Journal::open(&path).unwrap_err().to_string();
        assert!(err.contains("traces.jsonl:2"), "{err}");
    }
}
