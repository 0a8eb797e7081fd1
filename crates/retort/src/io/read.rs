//! Reading input records. JSONL streams line by line ([`RecordReader`]); a JSON array (a file whose
//! first non-space byte is `[`) is read whole. Every error names the file and line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One input record: a JSON object with its 1-based line (or array index + 1).
pub type Numbered = (usize, Map<String, Value>);

/// Streams records from a JSONL file or a JSON array file.
pub struct RecordReader {
    path: PathBuf,
    inner: Inner,
}

enum Inner {
    Lines {
        reader: BufReader<fs_err::File>,
        line: usize,
        buf: String,
    },
    Array(std::vec::IntoIter<Value>, usize),
}

impl RecordReader {
    /// Opens `path`, detecting JSONL or a JSON array from the first non-space byte.
    pub fn open(path: &Path) -> Result<Self> {
        let mut reader = BufReader::new(fs_err::File::open(path)?);
        let first = loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break None;
            }
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => break Some(buf[i]),
                None => {
                    let n = buf.len();
                    reader.consume(n);
                }
            }
        };
        let inner = if first == Some(b'[') {
            let value: Value = serde_json::from_reader(reader).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                line: e.line(),
                message: format!("invalid JSON array: {e}"),
            })?;
            match value {
                Value::Array(items) => Inner::Array(items.into_iter(), 0),
                _ => unreachable!("a document starting with `[` is an array"),
            }
        } else {
            // Re-open so line numbers count from the start of the file.
            Inner::Lines {
                reader: BufReader::new(fs_err::File::open(path)?),
                line: 0,
                buf: String::new(),
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, line: usize, message: String) -> Error {
        Error::Input {
            path: self.path.clone(),
            line,
            message,
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<Numbered>;

    fn next(&mut self) -> Option<Self::Item> {
        let (line_no, parsed) = match &mut self.inner {
            Inner::Array(items, index) => {
                let value = items.next()?;
                *index += 1;
                (*index, Ok(value))
            }
            Inner::Lines { reader, line, buf } => loop {
                buf.clear();
                *line += 1;
                match reader.read_line(buf) {
                    Ok(0) => return None,
                    Ok(_) if buf.trim().is_empty() => continue,
                    Ok(_) => break (*line, serde_json::from_str::<Value>(buf.trim())),
                    Err(e) => {
                        let n = *line;
                        return Some(Err(self.error(n, format!("cannot read line: {e}"))));
                    }
                }
            },
        };
        Some(match parsed {
            Ok(Value::Object(map)) => Ok((line_no, map)),
            Ok(other) => Err(self.error(
                line_no,
                format!("expected a JSON object, got {}", kind(&other)),
            )),
            Err(e) => Err(self.error(line_no, format!("invalid JSON: {e}"))),
        })
    }
}

/// Reads every record of `path` (JSONL or JSON array).
pub fn read_records(path: &Path) -> Result<Vec<Numbered>> {
    RecordReader::open(path)?.collect()
}

/// A JSON value's kind, for error messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_array_inputs_and_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        fs_err::write(&jsonl, "{\"a\":1}\n\n{\"a\":2}\n").unwrap();
        let records = read_records(&jsonl).unwrap();
        assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3]);
        let array = dir.path().join("b.json");
        fs_err::write(&array, " [{\"a\":1},{\"a\":2}]").unwrap();
        assert_eq!(read_records(&array).unwrap().len(), 2);
        let broken = dir.path().join("c.jsonl");
        fs_err::write(&broken, "{\"a\":1}\n{\"a\":\n").unwrap();
        let err = read_records(&broken).unwrap_err().to_string();
        assert!(err.contains("c.jsonl:2: invalid JSON"), "{err}");
        fs_err::write(&broken, "[1]\n").unwrap();
        let err = read_records(&broken).unwrap_err().to_string();
        assert!(err.contains("expected a JSON object"), "{err}");
    }
}
