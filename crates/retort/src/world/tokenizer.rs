//! The world's tokenizer: a byte-level BPE trained with the `tokenizers` crate on the world's own
//! text (prompts, teacher solutions, the base student's corpus), in Qwen2's format.
//!
//! The pipeline is Qwen2's: NFC normalisation, the Qwen2 split regex (every digit its own
//! pre-token, so numbers are spelled digit by digit), byte-level mapping without a prefix space,
//! a BPE model and a byte-level decoder. `<|endoftext|>` is the only added (special) token; it is
//! the EOS and the padding token. Training is deterministic: the corpus comes from fixed seeds and
//! the BPE trainer breaks ties by pair ids, which do not depend on hash order.

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::EOS;
use super::problems::generate_problems;
use super::styles::{student_corpus, teacher_solution, terse_solution};
use crate::{Error, Result};

/// Qwen2's pre-tokenizer regex: contractions, letter runs with one leading non-letter, single
/// digits (`\p{N}`, not `\p{N}{1,3}`), punctuation runs, newlines and whitespace.
pub const QWEN2_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The default vocabulary size (ids), `<|endoftext|>` included.
pub const DEFAULT_VOCAB_SIZE: usize = 256;

/// Problems per level (1 to 5) behind the tokenizer corpus.
const CORPUS_PER_LEVEL: usize = 600;

/// The text the tokenizer learns from: for problems of levels 1-5 drawn from `seed`, each prompt
/// followed by its teacher solution, its terse solution, and the base student's corpus rows.
pub fn world_texts(seed: u64) -> Vec<String> {
    let problems = generate_problems(
        seed,
        &[1, 2, 3, 4, 5],
        CORPUS_PER_LEVEL,
        "tok",
        &Default::default(),
    );
    let mut texts = Vec::with_capacity(problems.len() * 3);
    for problem in &problems {
        texts.push(format!("{}{}", problem.prompt(), teacher_solution(problem)));
        texts.push(format!("{}{}", problem.prompt(), terse_solution(problem)));
    }
    for (prompt, completion) in student_corpus(seed, &problems) {
        texts.push(format!("{prompt}{completion}"));
    }
    texts
}

fn tok_err(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("world tokenizer: {what}: {err}"))
}

/// An untrained tokenizer with Qwen2's normaliser, pre-tokenizer, post-processor and decoder.
fn pipeline() -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err("bad split pattern", e))?;
    let pre: Vec<PreTokenizerWrapper> =
        vec![split.into(), ByteLevel::new(false, false, false).into()];
    tokenizer
        .with_normalizer(Some(NFC))
        .map_err(|e| tok_err("normaliser", e))?
        .with_pre_tokenizer(Some(Sequence::new(pre)))
        .with_post_processor(Some(ByteLevel::new(false, false, false)))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Trains a byte-level BPE of `vocab_size` ids (`<|endoftext|>` is id 0) on `texts`.
///
/// Only bytes that occur in `texts` get ids (the world's alphabet is small), so the vocabulary
/// stays near `vocab_size` instead of starting at 256 byte tokens.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let eos = AddedToken::from(EOS, true);
    let mut tokenizer = pipeline()?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![eos.clone()])
        .build()
        .into();
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| tok_err("training failed", e))?;
    tokenizer
        .add_special_tokens([eos])
        .map_err(|e| tok_err("cannot add the end-of-text token", e))?;
    Ok(tokenizer)
}

/// The world's chat template: a user turn renders as the world's own `Q: ...\nA:` prompt and an
/// assistant turn as its text, so chat and GSM8K-shaped records give the prompts the models were
/// trained on.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}{%- if message['role'] == 'user' %}\
     {{- 'Q: ' + message['content'] + '\\nA:' }}{%- elif message['role'] == 'assistant' %}\
     {{- message['content'] }}{%- endif %}{%- endfor %}";

/// `tokenizer_config.json` for the world tokenizer: `<|endoftext|>` as EOS and padding, no BOS,
/// and [`CHAT_TEMPLATE`] (world prompts are raw `Q: ...\nA:` text).
pub fn tokenizer_config(eos_id: u32) -> Value {
    json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            eos_id.to_string(): {
                "content": EOS,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true
            }
        },
        "bos_token": null,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": EOS,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null
    })
}

/// Trains the world tokenizer on [`world_texts`]`(seed)` and writes `tokenizer.json` and
/// `tokenizer_config.json` into `dir` (created if missing). Returns the vocabulary size.
pub fn write_world_tokenizer(dir: &Path, seed: u64, vocab_size: usize) -> Result<usize> {
    let tokenizer = train_tokenizer(&world_texts(seed), vocab_size)?;
    let eos_id = tokenizer
        .token_to_id(EOS)
        .ok_or_else(|| tok_err("after training", format!("`{EOS}` has no id")))?;
    let text = tokenizer
        .to_string(true)
        .map_err(|e| tok_err("cannot serialise", e))?;
    fs_err::create_dir_all(dir)?;
    fs_err::write(dir.join("tokenizer.json"), text)?;
    let config = serde_json::to_string_pretty(&tokenizer_config(eos_id))
        .map_err(|e| tok_err("config", e))?;
    fs_err::write(dir.join("tokenizer_config.json"), config)?;
    Ok(tokenizer.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_corpus() -> Vec<String> {
        let mut texts = world_texts(11);
        texts.truncate(600);
        texts
    }

    #[test]
    fn training_is_deterministic() {
        let texts = small_corpus();
        let a = train_tokenizer(&texts, 200)
            .expect("train")
            .to_string(false)
            .expect("json");
        let b = train_tokenizer(&texts, 200)
            .expect("train")
            .to_string(false)
            .expect("json");
        assert_eq!(a, b);
    }

    #[test]
    fn round_trips_world_text_and_splits_digits() {
        let texts = small_corpus();
        let tokenizer = train_tokenizer(&texts, 200).expect("train");
        assert_eq!(tokenizer.token_to_id(EOS), Some(0));
        assert!(tokenizer.get_vocab_size(true) <= 200);
        for text in world_texts(12).iter().take(300) {
            let with_eos = format!("{text}{EOS}");
            let encoding = tokenizer.encode(with_eos.as_str(), false).expect("encode");
            assert_eq!(encoding.get_ids().last(), Some(&0), "{text}");
            let decoded = tokenizer.decode(encoding.get_ids(), true).expect("decode");
            assert_eq!(&decoded, text);
            // No token holds more than one digit.
            for token in encoding.get_tokens() {
                assert!(
                    token.chars().filter(char::is_ascii_digit).count() <= 1,
                    "{token}"
                );
            }
        }
        let digits = tokenizer.encode(" 1234567890", false).expect("encode");
        let pieces: Vec<&str> = digits.get_tokens().iter().map(String::as_str).collect();
        assert_eq!(
            pieces,
            ["Ġ", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]
        );
    }

    #[test]
    fn written_files_load_in_retort_model() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = write_world_tokenizer(dir.path(), 5, 180).expect("write");
        assert!(size <= 180 && size > 60, "{size}");
        let tokenizer = retort_model::Tokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tokenizer.eos_token(), Some(EOS));
        assert_eq!(tokenizer.pad_token_id(), Some(0));
        let ids = tokenizer
            .encode("Q: Mia has 12 apples.\nA: 12 + 7 = 19.", false)
            .expect("encode");
        assert_eq!(
            tokenizer.decode(&ids, true).expect("decode"),
            "Q: Mia has 12 apples.\nA: 12 + 7 = 19."
        );
    }
}
