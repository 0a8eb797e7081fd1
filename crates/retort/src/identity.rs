//! Run identity: what determines the records a command writes, recorded in the output's
//! manifest when the run starts, so that an output never mixes the results of two different runs.
//!
//! [`Identity`] holds the result-changing settings of a command's resolved plan (the command,
//! each model's spec with the hashes of its weights and tokenizer files, sampling, seed, objective,
//! ...), never the "how many / how fast" ones (`--samples`, `--max-steps`, `--concurrency`,
//! `--threads`, appended input records). [`begin`] compares it with the manifest already beside
//! the output:
//!
//! | what is there | rerun |
//! |---|---|
//! | nothing (or only the manifest of a run that wrote nothing) | starts |
//! | a run with the same identity | resumes or extends it (commands that need `--resume` ask for it) |
//! | a run with another identity | refused: each differing setting is named (old → new); output and manifest stay byte-identical |
//! | an output with no manifest of ours | refused |
//!
//! `--overwrite` removes the old output and starts again. The manifest then carries a
//! [`RunStatus`]: `running` from the start, and `complete`, `interrupted` or `failed` at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, manifest_path, sha256_file};
use crate::model_spec::ModelSpec;

/// Where a run stands, as its manifest says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Started and not finished (or killed without a chance to say so).
    #[default]
    Running,
    /// Finished; the output is whole.
    Complete,
    /// Stopped by Ctrl-C or SIGTERM; a rerun of the same command resumes.
    Interrupted,
    /// Stopped by an error.
    Failed,
}

/// The settings that determine a command's records, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(pub BTreeMap<String, Value>);

impl Identity {
    /// An identity for `command`.
    pub fn new(command: &str) -> Self {
        let mut settings = BTreeMap::new();
        settings.insert("command".to_string(), Value::from(command));
        Self(settings)
    }

    /// Adds a setting.
    pub fn with(mut self, name: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.0.insert(name.to_string(), value);
        self
    }

    /// Adds every field of a serialisable settings struct except `except` (each a field name).
    pub fn with_fields(mut self, settings: impl Serialize, except: &[&str]) -> Self {
        if let Ok(Value::Object(fields)) = serde_json::to_value(settings) {
            for (name, value) in fields {
                if !except.contains(&name.as_str()) {
                    self.0.insert(name, value);
                }
            }
        }
        self
    }

    /// Adds the device and dtype of the local models (`compute`), unless they are the default
    /// (CPU, auto), so that outputs written with the defaults keep one identity.
    pub fn with_compute(mut self, compute: crate::compute::Compute) -> Self {
        if !compute.is_default() {
            self.0
                .insert("compute".to_string(), Value::from(compute.to_string()));
        }
        self
    }

    /// Adds the model in `role`: for a local model its spec and the hashes of its weight and
    /// tokenizer files (the tokenizer files hold the chat template); for a server the served
    /// model's name, since its addresses may change between runs (replicas, a restarted server)
    /// while the model stays the same.
    pub fn with_model(mut self, role: &str, spec: &ModelSpec) -> Result<Self> {
        let name = match spec {
            ModelSpec::Server(server) => format!("openai:…#{}", server.model),
            local => local.to_string(),
        };
        self.0.insert(role.to_string(), Value::from(name));
        if let Some(dir) = spec.local_path().filter(|d| d.is_dir()) {
            self.0
                .insert(format!("{role}.files"), model_fingerprint(&dir)?);
        }
        Ok(self)
    }

    /// The settings that differ from `old`, as `name: old → new` lines.
    pub fn differences(&self, old: &Self) -> Vec<String> {
        let mut names: Vec<&String> = self.0.keys().chain(old.0.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|name| {
                let (before, after) = (old.0.get(name), self.0.get(name));
                (before != after).then(|| format!("{name}: {} → {}", shown(before), shown(after)))
            })
            .collect()
    }
}

fn shown(value: Option<&Value>) -> String {
    match value {
        None => "(not set)".into(),
        Some(Value::Object(map)) if map.values().all(Value::is_string) && !map.is_empty() => {
            format!("(files with other contents: {})", map.len())
        }
        Some(value) => {
            let text = value.to_string();
            if text.chars().count() > 120 {
                format!("{}…", text.chars().take(120).collect::<String>())
            } else {
                text
            }
        }
    }
}

/// Files of a model folder that change what it computes.
fn fingerprinted(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".jinja")
        || matches!(
            name,
            "config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "generation_config.json"
                | "adapter_config.json"
        )
}

/// SHA-256 of each fingerprinted file of `dir`, memoised by path, size and modification time
/// (a command hashes a multi-gigabyte model once, not once per manifest write).
fn model_fingerprint(dir: &Path) -> Result<Value> {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static MEMO: Mutex<Option<HashMap<Key, String>>> = Mutex::new(None);
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(fingerprinted)
        })
        .collect();
    files.sort();
    let mut out = serde_json::Map::new();
    for file in files {
        let meta = fs_err::metadata(&file)?;
        let key = (file.clone(), meta.len(), meta.modified().ok());
        let cached = MEMO
            .lock()
            .ok()
            .and_then(|memo| memo.as_ref().and_then(|m| m.get(&key).cloned()));
        let hash = match cached {
            Some(hash) => hash,
            None => {
                let hash = sha256_file(&file)?;
                if let Ok(mut memo) = MEMO.lock() {
                    memo.get_or_insert_with(HashMap::new)
                        .insert(key, hash.clone());
                }
                hash
            }
        };
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.insert(name, Value::from(hash));
    }
    Ok(Value::Object(out))
}

/// How a command treats an output that holds a run of the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameRun {
    /// Continue it (journals: the records already there are kept).
    Continue,
    /// Continue only when the user asked for it (`--resume`), else refuse.
    NeedsResume(bool),
}

/// What [`begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// A new run (nothing was there, or `--overwrite` removed it).
    Fresh,
    /// The same run, which this one continues; its last status.
    Continued(RunStatus),
}

/// Checks `output` against `identity` (see the module docs), removes it with `overwrite`, and
/// writes the manifest with status `running`. The returned manifest is finished with
/// [`Manifest::finish`].
pub fn begin(
    output: &Path,
    identity: Identity,
    settings: Value,
    same_run: SameRun,
    overwrite: bool,
) -> Result<(Manifest, Begun)> {
    let path = manifest_path(output);
    let holds_output = match fs_err::metadata(output) {
        Ok(meta) if meta.is_dir() => fs_err::read_dir(output)?.next().is_some(),
        Ok(_) => true,
        Err(_) => false,
    };
    // A manifest without an output (a run that failed before writing anything) protects
    // nothing: the new run replaces it.
    let previous = if holds_output && path.is_file() {
        Some(Manifest::read(&path))
    } else {
        None
    };
    let mut begun = Begun::Fresh;
    if overwrite {
        if output.is_dir() {
            fs_err::remove_dir_all(output)?;
        } else if output.exists() {
            fs_err::remove_file(output)?;
        }
        if path.exists() {
            fs_err::remove_file(&path)?;
        }
    } else if holds_output {
        let shown = output.display();
        let previous = match previous {
            Some(Ok(manifest)) if !manifest.identity.0.is_empty() => manifest,
            _ => {
                return Err(Error::Invalid(format!(
                    "`{shown}` already exists and has no run manifest of this retort version \
                     (`{}`)\nhint: choose another output, or pass `--overwrite` to replace it",
                    path.display()
                )));
            }
        };
        let differences = identity.differences(&previous.identity);
        if !differences.is_empty() {
            return Err(Error::Invalid(format!(
                "`{shown}` holds a run with other settings; rerunning into it would mix their \
                 results:\n  {}\nhint: choose another output, or pass `--overwrite` to start \
                 again (nothing was changed)",
                differences.join("\n  ")
            )));
        }
        if same_run == SameRun::NeedsResume(false) {
            return Err(Error::Invalid(format!(
                "`{shown}` already holds this run (status: {})\nhint: pass `--resume` to continue \
                 it, or `--overwrite` to start again",
                previous.status.name()
            )));
        }
        begun = Begun::Continued(previous.status);
    }
    let mut manifest = Manifest::new(settings);
    manifest.identity = identity;
    manifest.status = RunStatus::Running;
    manifest.write_beside(output)?;
    Ok((manifest, begun))
}

impl RunStatus {
    /// `running`, `complete`, `interrupted` or `failed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
        }
    }
}

/// Refuses an output folder that is, or lies inside, one of `protected` (role, folder): a
/// model's own folder or the Hugging Face cache. `--overwrite` does not lift this.
pub fn refuse_inside(output: &Path, protected: &[(&str, PathBuf)]) -> Result<()> {
    let target = absolute_resolved(output);
    for (role, dir) in protected {
        let dir = absolute_resolved(dir);
        if target.starts_with(&dir) {
            return Err(Error::Invalid(format!(
                "the output `{}` is {} {role} `{}`; writing there would destroy it\nhint: choose \
                 a new output folder",
                output.display(),
                if target == dir {
                    "the folder of the"
                } else {
                    "inside the folder of the"
                },
                dir.display()
            )));
        }
    }
    Ok(())
}

/// `path` made absolute with symlinks resolved as far as it exists (the rest appended).
fn absolute_resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return absolute,
        }
    }
    let mut resolved = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_setting() {
        let old = Identity::new("generate")
            .with("temperature", 1.0)
            .with("seed", 0);
        let new = Identity::new("generate")
            .with("temperature", 0.5)
            .with("seed", 0)
            .with("top_p", 0.9);
        assert_eq!(
            new.differences(&old),
            ["temperature: 1.0 → 0.5", "top_p: (not set) → 0.9"]
        );
        assert!(old.differences(&old).is_empty());
    }

    #[test]
    fn reruns_resume_refuse_or_overwrite() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let output = dir.path().join("out.jsonl");
        let identity = || Identity::new("generate").with("seed", 1);
        let (mut manifest, begun) =
            begin(&output, identity(), Value::Null, SameRun::Continue, false)?;
        assert_eq!(begun, Begun::Fresh);
        fs_err::write(&output, "{\"id\": 1}\n")?;
        manifest.finish(&output, RunStatus::Complete)?;
        let before = (
            fs_err::read(&output)?,
            fs_err::read(manifest_path(&output))?,
        );
        let (_, begun) = begin(&output, identity(), Value::Null, SameRun::Continue, false)?;
        assert_eq!(begun, Begun::Continued(RunStatus::Complete));
        let other = Identity::new("generate").with("seed", 2);
        let manifest_now = fs_err::read(manifest_path(&output))?;
        let err = begin(
            &output,
            other.clone(),
            Value::Null,
            SameRun::Continue,
            false,
        )
        .expect_err("other settings");
        assert!(err.to_string().contains("seed: 1 → 2"), "{err}");
        assert_eq!(fs_err::read(&output)?, before.0);
        assert_eq!(fs_err::read(manifest_path(&output))?, manifest_now);
        let (_, begun) = begin(&output, other, Value::Null, SameRun::Continue, true)?;
        assert_eq!(begun, Begun::Fresh);
        assert!(!output.exists());
        let stranger = dir.path().join("theirs.jsonl");
        fs_err::write(&stranger, "x")?;
        let err = begin(&stranger, identity(), Value::Null, SameRun::Continue, false);
        assert!(err.is_err_and(|e| e.to_string().contains("--overwrite")));
        Ok(())
    }

    #[test]
    fn outputs_inside_models_are_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("model");
        fs_err::create_dir_all(&model)?;
        let protected = [("student", model.clone())];
        assert!(refuse_inside(&model, &protected).is_err());
        assert!(refuse_inside(&model.join("run/x"), &protected).is_err());
        assert!(refuse_inside(&dir.path().join("model2"), &protected).is_ok());
        Ok(())
    }
}
