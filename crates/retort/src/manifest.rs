//! The manifest written beside every output (`<output>.manifest.json`): the command line with
//! secrets redacted, retort's version, the run's status and [`Identity`], content hashes of
//! inputs and model weights, settings, counts and wall time. Chained manifests give a run's
//! lineage. Commands write it when they start ([`crate::identity::begin`]) and again when they
//! end ([`Manifest::finish`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::identity::{Identity, RunStatus};
use crate::io::AtomicFile;
use crate::model_spec::ModelSpec;
pub use crate::model_spec::redact;

/// A file and its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hashed {
    /// The path as given.
    pub path: String,
    /// Hex SHA-256 of the contents.
    pub sha256: String,
}

/// One command's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The command line, secrets redacted.
    pub command: Vec<String>,
    /// retort's version.
    pub retort_version: String,
    /// Where the run stands.
    #[serde(default)]
    pub status: RunStatus,
    /// What determines the records (compared when a command reruns into this output).
    #[serde(default)]
    pub identity: Identity,
    /// Records skipped because they cannot work alone (e.g. a prompt longer than the context).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Input files and their hashes.
    pub inputs: Vec<Hashed>,
    /// Models used: spec and hash of their weight files.
    pub models: Vec<Value>,
    /// Settings that shaped the output (sampling, verifier policy, ...).
    pub settings: Value,
    /// Counts (records in/out, failures, tokens, ...).
    pub counts: Value,
    /// Wall time of the command.
    pub wall_seconds: f64,
}

impl Manifest {
    /// A manifest for the current process's command line.
    pub fn new(settings: Value) -> Self {
        Self {
            command: redact_args(std::env::args()),
            retort_version: env!("CARGO_PKG_VERSION").to_string(),
            status: RunStatus::Running,
            identity: Identity::default(),
            skipped: Vec::new(),
            inputs: Vec::new(),
            models: Vec::new(),
            settings,
            counts: Value::Null,
            wall_seconds: 0.0,
        }
    }

    /// Adds an input file with its content hash.
    pub fn add_input(&mut self, path: &Path) -> Result<()> {
        self.inputs.push(Hashed {
            path: path.display().to_string(),
            sha256: sha256_file(path)?,
        });
        Ok(())
    }

    /// Adds a model: its spec and, for a local model, the hashes of its `*.safetensors` files.
    pub fn add_model(&mut self, spec: &ModelSpec) -> Result<()> {
        let mut weights = Vec::new();
        if let Some(dir) = spec.local_path().filter(|dir| dir.is_dir()) {
            let mut files: Vec<PathBuf> = fs_err::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            for file in files {
                weights.push(Hashed {
                    path: file.display().to_string(),
                    sha256: sha256_file(&file)?,
                });
            }
        }
        self.models
            .push(serde_json::json!({ "spec": spec.to_string(), "weights": weights }));
        Ok(())
    }

    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| crate::Error::Input {
            path: path.to_path_buf(),
            line: e.line(),
            message: format!("not a retort manifest: {e}"),
        })
    }

    /// Sets the final status and writes the manifest beside `output`.
    pub fn finish(&mut self, output: &Path, status: RunStatus) -> Result<PathBuf> {
        self.status = status;
        self.write_beside(output)
    }

    /// Writes `<output>.manifest.json` atomically.
    pub fn write_beside(&self, output: &Path) -> Result<PathBuf> {
        let path = manifest_path(output);
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| crate::Error::Invalid(e.to_string()))?;
        AtomicFile::write_all(&path, &json)?;
        Ok(path)
    }
}

/// `<output>.manifest.json`.
pub fn manifest_path(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".manifest.json");
    output.with_file_name(name)
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Flags whose value is a secret, matched by name exactly (`--max-new-tokens` is not one).
pub const SECRET_FLAGS: [&str; 6] = [
    "--api-key",
    "--token",
    "--hf-token",
    "--secret",
    "--password",
    "--auth",
];

/// Redacts credentials in URLs (`user:pass@`) and the values of the [`SECRET_FLAGS`]; every other
/// argument is kept verbatim.
pub fn redact_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut hide_next = false;
    for arg in args {
        if hide_next {
            out.push("****".into());
            hide_next = false;
            continue;
        }
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if SECRET_FLAGS.contains(&flag.to_ascii_lowercase().as_str()) {
            match arg.split_once('=') {
                Some((flag, _)) => out.push(format!("{flag}=****")),
                None => {
                    out.push(arg);
                    hide_next = true;
                }
            }
        } else {
            out.push(redact(&arg));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let args = [
            "retort",
            "--api-key",
            "sk-123",
            "--token=abc",
            "openai:http://u:p@host/v1#m",
            "--max-new-tokens",
            "48",
            "--api-keys-file=k",
        ]
        .map(String::from);
        let out = redact_args(args);
        assert_eq!(
            out,
            [
                "retort",
                "--api-key",
                "****",
                "--token=****",
                "openai:http://****@host/v1#m",
                "--max-new-tokens",
                "48",
                "--api-keys-file=k",
            ]
        );
    }
}
