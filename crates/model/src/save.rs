//! Save a model as a Hugging Face folder that transformers, vLLM and [`crate::load()`] read as is.
//!
//! [`save_hf_folder`] writes `model.safetensors` (float32, metadata `{"format": "pt"}`, the
//! Hugging Face tensor names; no `lm_head.weight` when embeddings are tied), `config.json` (the
//! source config with `dtype`/`torch_dtype` set to `float32`, every other key kept),
//! `generation_config.json` and the tokenizer files of the source folder. The folder appears
//! atomically: everything is written into a temp folder beside the target, then renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::{Error, Result};

/// Tokenizer and chat files copied from the source folder when present.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Writes a Hugging Face folder at `dir` from named tensors, the model config and the tokenizer
/// files in `source_dir` (the folder the model was loaded from). Replaces `dir` if it exists.
pub fn save_hf_folder(
    dir: &Path,
    tensors: &[(String, Tensor)],
    config: &ModelConfig,
    source_dir: &Path,
) -> Result<()> {
    save_hf_folder_raw(
        dir,
        tensors,
        &config.raw,
        config.tie_word_embeddings,
        source_dir,
    )
}

/// [`save_hf_folder`] from every variable of a `VarMap` (as [`crate::load::load_trainable`]
/// returns it).
pub fn save_varmap(
    dir: &Path,
    varmap: &candle_nn::VarMap,
    config: &ModelConfig,
    source_dir: &Path,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = crate::train::named_vars(varmap)
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    save_hf_folder(dir, &tensors, config, source_dir)
}

/// [`save_hf_folder`] from a raw `config.json` value and the tie flag.
pub fn save_hf_folder_raw(
    dir: &Path,
    tensors: &[(String, Tensor)],
    raw_config: &Value,
    tie_word_embeddings: bool,
    source_dir: &Path,
) -> Result<()> {
    save_hf_folder_with(
        dir,
        tensors,
        raw_config,
        tie_word_embeddings,
        source_dir,
        |_| Ok(()),
    )
}

/// [`save_hf_folder_raw`] plus `extra`, which writes more files (optimizer state,
/// `trainer_state.json`, ...) into the same temp folder, so a checkpoint appears whole or not
/// at all.
pub fn save_hf_folder_with(
    dir: &Path,
    tensors: &[(String, Tensor)],
    raw_config: &Value,
    tie_word_embeddings: bool,
    source_dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let weights = serialize_weights(tensors, tie_word_embeddings)?;
    let config_json = float32_config(raw_config)?;
    let tokenizer_path = source_dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::Model(format!(
            "{}: not found; a saved model needs the source folder's tokenizer",
            tokenizer_path.display()
        )));
    }
    let generation = generation_config(source_dir, raw_config)?;
    write_dir_atomic(dir, |tmp| {
        fs_err::write(tmp.join("model.safetensors"), &weights)?;
        fs_err::write(tmp.join("config.json"), to_pretty(&config_json)?)?;
        if let Some(generation) = &generation {
            fs_err::write(tmp.join("generation_config.json"), generation)?;
        }
        for name in TOKENIZER_FILES {
            let source = source_dir.join(name);
            if source.is_file() {
                fs_err::copy(&source, tmp.join(name))?;
            }
        }
        extra(tmp)
    })
}

/// Safetensors bytes for `tensors` in float32 with `{"format": "pt"}`; drops `lm_head.weight`
/// for tied models and requires it for untied ones.
fn serialize_weights(tensors: &[(String, Tensor)], tie_word_embeddings: bool) -> Result<Vec<u8>> {
    let mut out: Vec<(&str, Tensor)> = Vec::with_capacity(tensors.len());
    let mut has_lm_head = false;
    let mut seen = std::collections::HashSet::new();
    for (name, tensor) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::Model(format!(
                "save: tensor `{name}` is given twice"
            )));
        }
        if name == "lm_head.weight" {
            has_lm_head = true;
            if tie_word_embeddings {
                continue;
            }
        }
        let tensor = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        out.push((name.as_str(), tensor));
    }
    if !tie_word_embeddings && !has_lm_head {
        return Err(Error::Model(
            "save: the config says `tie_word_embeddings: false` but there is no `lm_head.weight`"
                .into(),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(out.iter().map(|(n, t)| (*n, t)), Some(metadata))
        .map_err(|e| Error::Model(format!("save: cannot serialise weights: {e}")))
}

/// The source config with its dtype key(s) set to `float32` (`torch_dtype` added if neither
/// `dtype` nor `torch_dtype` is present).
pub fn float32_config(raw: &Value) -> Result<Value> {
    let mut config = raw.clone();
    let object = config
        .as_object_mut()
        .ok_or_else(|| Error::Model("save: config.json is not a JSON object".into()))?;
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if let Some(value) = object.get_mut(key) {
            *value = Value::from("float32");
            set = true;
        }
    }
    if !set {
        object.insert("torch_dtype".into(), Value::from("float32"));
    }
    Ok(config)
}

/// The source `generation_config.json` as is, or one with the config's `bos_token_id` and
/// `eos_token_id` when the source has none and the config names them.
fn generation_config(source_dir: &Path, raw_config: &Value) -> Result<Option<String>> {
    let path = source_dir.join("generation_config.json");
    if path.is_file() {
        return Ok(Some(fs_err::read_to_string(&path)?));
    }
    let mut generation = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(value) = raw_config.get(key).filter(|v| !v.is_null()) {
            generation.insert(key.into(), value.clone());
        }
    }
    if generation.is_empty() {
        return Ok(None);
    }
    Ok(Some(to_pretty(&Value::Object(generation))?))
}

fn to_pretty(value: &Value) -> Result<String> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Model(format!("save: cannot serialise JSON: {e}")))?;
    text.push('\n');
    Ok(text)
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A sibling path `<parent>/.<name>.<tag>-<pid>-<n>` for temp files and folders.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Model(format!("{}: not a file or folder name", path.display())))?;
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let file = format!(
        ".{}.{tag}-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    );
    Ok(path.with_file_name(file))
}

/// Writes `bytes` to `path` through a temp file beside it and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs_err::create_dir_all(parent)?;
    }
    let tmp = sibling(path, "tmp")?;
    let written = fs_err::write(&tmp, bytes).and_then(|()| fs_err::rename(&tmp, path));
    if written.is_err() {
        let _ = fs_err::remove_file(&tmp);
    }
    Ok(written?)
}

/// Builds a folder atomically: `fill` writes into a fresh temp folder beside `dir`, which then
/// replaces `dir` (an existing `dir` is moved aside and removed only after the swap). On error
/// the temp folder is removed and `dir` is untouched.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs_err::create_dir_all(parent)?;
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Model(format!(
            "{}: exists and is not a folder",
            dir.display()
        )));
    }
    let tmp = sibling(dir, "tmp")?;
    fs_err::create_dir(&tmp)?;
    let result = fill(&tmp).and_then(|()| {
        if dir.exists() {
            let old = sibling(dir, "old")?;
            fs_err::rename(dir, &old)?;
            if let Err(e) = fs_err::rename(&tmp, dir) {
                // Put the previous folder back so a failed save loses nothing.
                let _ = fs_err::rename(&old, dir);
                return Err(e.into());
            }
            fs_err::remove_dir_all(&old)?;
        } else {
            fs_err::rename(&tmp, dir)?;
        }
        Ok(())
    });
    if result.is_err() && tmp.exists() {
        let _ = fs_err::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_keys_become_float32() -> Result<()> {
        let five = serde_json::json!({"dtype": "bfloat16", "hidden_size": 8});
        let out = float32_config(&five)?;
        assert_eq!(out["dtype"], "float32");
        assert_eq!(out["hidden_size"], 8);
        assert!(out.get("torch_dtype").is_none());
        let four = serde_json::json!({"torch_dtype": "float16"});
        assert_eq!(float32_config(&four)?["torch_dtype"], "float32");
        let none = serde_json::json!({});
        assert_eq!(float32_config(&none)?["torch_dtype"], "float32");
        Ok(())
    }

    #[test]
    fn failed_fill_leaves_target_untouched() -> Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("out");
        write_dir_atomic(&dir, |tmp| Ok(fs_err::write(tmp.join("a"), "1")?))?;
        let failed = write_dir_atomic(&dir, |tmp| {
            fs_err::write(tmp.join("a"), "2")?;
            Err(Error::Model("boom".into()))
        });
        assert!(failed.is_err());
        assert_eq!(fs_err::read_to_string(dir.join("a"))?, "1");
        write_dir_atomic(&dir, |tmp| Ok(fs_err::write(tmp.join("b"), "3")?))?;
        assert!(!dir.join("a").exists() && dir.join("b").exists());
        // Nothing but the target is left beside it.
        assert_eq!(fs_err::read_dir(root.path())?.count(), 1);
        Ok(())
    }
}
