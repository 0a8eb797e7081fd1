//! Reading input records. JSONL streams line by line ([`RecordReader`]); a JSON array (a file whose
//! first non-space byte is `[`) is read whole, and so is Parquet (a file starting with `PAR1`:
//! each row becomes a JSON object, nested lists and structs included). Every error names the
//! file and line (for arrays and Parquet, the 1-based record number).

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

const PARQUET_MAGIC: &[u8; 4] = b"PAR1";

fn read_parquet(path: &Path) -> Result<Vec<Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |message: String| Error::Input {
        path: path.to_path_buf(),
        line: 0,
        message,
    };
    let file = fs_err::File::open(path)?.into_parts().0;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("invalid Parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read Parquet rows: {e}")))?;
    rows.enumerate()
        .map(|(i, row)| {
            row.map(|r| r.to_json_value()).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("cannot decode Parquet row: {e}"),
            })
        })
        .collect()
}

impl RecordReader {
    /// Opens `path`, detecting Parquet from its magic bytes, and JSONL or a JSON array from the
    /// first non-space byte.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::Invalid(format!(
                "`{}` is a folder\nhint: pass a JSONL, JSON or Parquet file of records",
                path.display()
            )));
        }
        let mut reader = BufReader::new(fs_err::File::open(path)?);
        if reader.fill_buf()?.starts_with(PARQUET_MAGIC) {
            let rows = read_parquet(path)?;
            return Ok(Self {
                path: path.to_path_buf(),
                inner: Inner::Array(rows.into_iter(), 0),
            });
        }
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

#[cfg(test)]
mod parquet_tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// Writes a GSM8K-shaped Parquet file (snappy) with the parquet crate's low-level writer.
    fn write_gsm8k(path: &Path) {
        let schema = Arc::new(
            parse_message_type(
                "message schema { required binary question (UTF8); required binary answer (UTF8); required int64 level; }",
            )
            .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let file = fs_err::File::create(path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let questions: Vec<ByteArray> = ["How many apples?", "What is 2+3?"]
            .iter()
            .map(|s| ByteArray::from(*s))
            .collect();
        let answers: Vec<ByteArray> = ["She has 3.\n#### 3", "2+3=5\n#### 5"]
            .iter()
            .map(|s| ByteArray::from(*s))
            .collect();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&questions, None, None)
            .unwrap();
        column.close().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&answers, None, None)
            .unwrap();
        column.close().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        column
            .typed::<Int64Type>()
            .write_batch(&[1, 2], None, None)
            .unwrap();
        column.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn parquet_rows_become_records_and_problems() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-00000.parquet");
        write_gsm8k(&path);
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].0, 2);
        assert_eq!(records[1].1["level"], serde_json::json!(2));
        let problem =
            crate::records::problem_from_record(&records[0].1, Default::default(), &path, 1)
                .unwrap();
        assert_eq!(problem.answer.as_deref(), Some("3"));

        fs_err::write(&path, b"PAR1 definitely not parquet").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(
            err.contains("train-00000.parquet") && err.contains("Parquet"),
            "{err}"
        );
    }
}
