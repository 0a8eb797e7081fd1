//! Parity with the PyTorch/transformers fixtures in `shared/fixtures`: logits, log-probs,
//! left-padded batches, greedy generation, tokenizer and chat template; plus loader errors,
//! hub-cache resolution and sampling behaviour.

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use retort_model::{
    FinishReason, GenerationParams, LoadOptions, LoadedModel, Tokenizer, generate, load,
    score_batch,
};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");
const MODELS: [&str; 3] = ["qwen2-tiny", "qwen3-tiny", "llama-tiny"];
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read_json(path: &Path) -> Value {
    let text = fs_err::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float list")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load_fixture(name: &str) -> (LoadedModel, Value) {
    let dir = fixture(name);
    let model = load(dir.to_str().expect("utf8 path"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    (model, read_json(&dir.join("golden.json")))
}

#[test]
fn logits_match_golden() {
    for name in MODELS {
        let (m, golden) = load_fixture(name);
        let mut worst = 0.0f32;
        for prompt in golden["prompts"].as_array().expect("prompts") {
            let input = ids(&prompt["input_ids"]);
            let t = Tensor::new(input.as_slice(), &Device::Cpu)
                .expect("t")
                .unsqueeze(0)
                .expect("b");
            let logits = m.model.forward(&t, None, None).expect("forward");
            let got: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
            let want: Vec<f32> = prompt["logits"]
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(floats)
                .collect();
            let d = max_abs_diff(&got, &want);
            println!(
                "{name} prompt {}: logits max_abs_diff {d:.3e}",
                prompt["name"]
            );
            worst = worst.max(d);
        }
        assert!(worst < TOL, "{name}: logits max_abs_diff {worst}");
    }
}

#[test]
fn prompts_tokenize_and_render_like_golden() {
    for name in MODELS {
        let (m, golden) = load_fixture(name);
        for prompt in golden["prompts"].as_array().expect("prompts") {
            let text = prompt["text"].as_str().expect("text");
            if let Some(messages) = prompt["chat_messages"].as_array() {
                let add = prompt["add_generation_prompt"].as_bool().unwrap_or(true);
                let rendered = m
                    .tokenizer
                    .apply_chat_template(messages, add)
                    .expect("render");
                assert_eq!(rendered, text, "{name}: chat render");
                let chat_ids = m.tokenizer.encode_chat(messages, add).expect("encode_chat");
                assert_eq!(chat_ids, ids(&prompt["input_ids"]), "{name}: encode_chat");
            }
            let got = m.tokenizer.encode(text, true).expect("encode");
            assert_eq!(
                got,
                ids(&prompt["input_ids"]),
                "{name} {}: ids",
                prompt["name"]
            );
        }
    }
}

#[test]
fn scoring_matches_golden_unbatched_and_batched() {
    for name in MODELS {
        let (m, golden) = load_fixture(name);
        let rows = golden["scoring"].as_array().expect("scoring");
        let items: Vec<(Vec<u32>, Vec<u32>)> = rows
            .iter()
            .map(|r| (ids(&r["prompt_ids"]), ids(&r["continuation_ids"])))
            .collect();
        let pad = m.pad_id();
        let mut worst = 0.0f32;
        for (row, item) in rows.iter().zip(&items) {
            let got = score_batch(&m.model, std::slice::from_ref(item), pad).expect("score");
            let d = max_abs_diff(&got[0], &floats(&row["logprobs"]));
            println!("{name} scoring {}: max_abs_diff {d:.3e}", row["name"]);
            worst = worst.max(d);
        }
        let batched = score_batch(&m.model, &items, pad).expect("batch score");
        let mut worst_batch = 0.0f32;
        for (row, got) in rows.iter().zip(&batched) {
            worst_batch = worst_batch.max(max_abs_diff(got, &floats(&row["logprobs"])));
        }
        println!("{name} batched scoring: max_abs_diff {worst_batch:.3e}");
        assert!(worst < TOL, "{name}: scoring {worst}");
        assert!(worst_batch < TOL, "{name}: batched scoring {worst_batch}");
    }
}

/// The golden's own padded batch (mask and `cumsum - 1` positions) through `forward`.
#[test]
fn golden_padded_batch_matches_unpadded() {
    for name in MODELS {
        let (m, golden) = load_fixture(name);
        let bs = &golden["batch_scoring"];
        let to_tensor = |key: &str| {
            let rows: Vec<Vec<u32>> = bs[key].as_array().expect("rows").iter().map(ids).collect();
            let (b, t) = (rows.len(), rows[0].len());
            Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).expect("tensor")
        };
        let input = to_tensor("input_ids");
        let mask = to_tensor("attention_mask");
        let pos = to_tensor("position_ids");
        let logits = m
            .model
            .forward(&input, Some(&mask), Some(&pos))
            .expect("forward");
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).expect("lsm");
        let input_rows: Vec<Vec<u32>> = bs["input_ids"]
            .as_array()
            .expect("rows")
            .iter()
            .map(ids)
            .collect();
        let mut worst = 0.0f32;
        for (b, item) in bs["items"].as_array().expect("items").iter().enumerate() {
            let start = item["continuation_start"].as_u64().expect("start") as usize;
            let len = item["continuation_len"].as_u64().expect("len") as usize;
            let row = logp.i(b).expect("row");
            let got: Vec<f32> = (0..len)
                .map(|i| {
                    let tok = input_rows[b][start + i] as usize;
                    row.i((start + i - 1, tok))
                        .expect("lp")
                        .to_scalar::<f32>()
                        .expect("f32")
                })
                .collect();
            worst = worst.max(max_abs_diff(&got, &floats(&item["logprobs"])));
        }
        println!("{name} golden padded batch: max_abs_diff {worst:.3e}");
        assert!(worst < TOL, "{name}: padded batch {worst}");
    }
}

fn greedy(max_new_tokens: usize, eos: Vec<u32>) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        temperature: 0.0,
        eos_ids: eos,
        ..GenerationParams::default()
    }
}

#[test]
fn greedy_generation_matches_golden() {
    for name in MODELS {
        let (m, golden) = load_fixture(name);
        let gens = golden["generation"].as_array().expect("generation");
        let mut prompts = Vec::new();
        for g in gens {
            let prompt = ids(&g["prompt_ids"]);
            let params = greedy(
                g["kwargs"]["max_new_tokens"].as_u64().expect("max") as usize,
                ids(&g["eos_token_ids"]),
            );
            let out = generate(
                &m.model,
                &m.tokenizer,
                std::slice::from_ref(&prompt),
                &params,
            )
            .expect("generate");
            let want = ids(&g["new_token_ids"]);
            assert_eq!(out[0].token_ids, want, "{name} {}: greedy ids", g["name"]);
            assert_eq!(out[0].text, g["text_skip_special"].as_str().expect("text"));
            assert_eq!(
                m.tokenizer
                    .decode(&out[0].token_ids, false)
                    .expect("decode"),
                g["text"].as_str().expect("text")
            );
            let stopped = g["stopped_on_eos"].as_bool().expect("bool");
            let want_reason = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(out[0].finish_reason, want_reason);
            prompts.push(prompt);
        }
        // The chat prompt rebuilt from its messages through the template.
        let chat = golden["prompts"]
            .as_array()
            .expect("prompts")
            .iter()
            .find(|p| p["chat_messages"].is_array())
            .expect("a chat prompt");
        let text = m
            .tokenizer
            .apply_chat_template(chat["chat_messages"].as_array().expect("msgs"), true)
            .expect("render");
        let chat_ids = m.tokenizer.encode(&text, true).expect("encode");
        let chat_gen = gens
            .iter()
            .find(|g| g["name"] == "chat")
            .expect("chat generation");
        assert_eq!(
            chat_ids,
            ids(&chat_gen["prompt_ids"]),
            "{name}: chat prompt ids"
        );
        let out = generate(
            &m.model,
            &m.tokenizer,
            &[chat_ids],
            &greedy(24, m.eos_ids()),
        )
        .expect("gen");
        assert_eq!(
            out[0].token_ids,
            ids(&chat_gen["new_token_ids"]),
            "{name}: chat greedy ids"
        );
        // All three prompts in one left-padded batch.
        let batch = &golden["batch_generation"];
        let out =
            generate(&m.model, &m.tokenizer, &prompts, &greedy(24, m.eos_ids())).expect("batch");
        for (i, want) in batch["new_token_ids"]
            .as_array()
            .expect("rows")
            .iter()
            .enumerate()
        {
            assert_eq!(out[i].token_ids, ids(want), "{name}: batch row {i}");
        }
        println!("{name}: greedy ids exact (3 single, chat from messages, batch of 3)");
    }
}

fn check_tokenizer_golden(tok: &Tokenizer) {
    let golden = read_json(&fixture("tokenizer").join("tokenize_golden.json"));
    for case in golden["encode_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        assert_eq!(
            tok.encode(text, true).expect("encode"),
            want,
            "ids of {text:?}"
        );
        let tokens: Vec<String> = case["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("str").to_string())
            .collect();
        assert_eq!(
            tok.tokenize(text, true).expect("tokenize"),
            tokens,
            "tokens of {text:?}"
        );
        assert_eq!(
            tok.decode(&want, false).expect("decode"),
            case["decoded"].as_str().expect("s")
        );
        assert_eq!(
            tok.decode(&want, true).expect("decode"),
            case["decoded_skip_special"].as_str().expect("s")
        );
    }
    for case in golden["chat_cases"].as_array().expect("chat cases") {
        let messages = case["messages"].as_array().expect("messages");
        let add = case["add_generation_prompt"].as_bool().expect("bool");
        let rendered = tok.apply_chat_template(messages, add).expect("render");
        assert_eq!(
            rendered,
            case["rendered"].as_str().expect("s"),
            "chat case {}",
            case["name"]
        );
        assert_eq!(
            tok.encode(&rendered, true).expect("encode"),
            ids(&case["ids"])
        );
    }
    assert_eq!(tok.eos_token_id(), Some(511));
    assert_eq!(tok.pad_token_id(), Some(509));
    assert_eq!(tok.vocab_size(), 512);
}

#[test]
fn tokenizer_golden_from_chat_template_jinja() {
    let dir = fixture("tokenizer");
    assert!(
        !dir.join("tokenizer_config.json").exists() || {
            let cfg = read_json(&dir.join("tokenizer_config.json"));
            cfg.get("chat_template").is_none()
        }
    );
    let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
    check_tokenizer_golden(&tok);
}

#[test]
fn tokenizer_golden_from_tokenizer_config() {
    for name in MODELS {
        let tok = Tokenizer::from_dir(&fixture(name)).expect("tokenizer");
        check_tokenizer_golden(&tok);
    }
}

/// Copies the files of a fixture into `dst`.
fn copy_fixture(name: &str, dst: &Path) {
    fs_err::create_dir_all(dst).expect("mkdir");
    for entry in fs_err::read_dir(fixture(name)).expect("read dir") {
        let entry = entry.expect("entry");
        fs_err::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn hf_cache_resolution() {
    let cache = tempfile::tempdir().expect("tempdir");
    let repo = cache.path().join("models--tiny-org--qwen2-tiny");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    // The real layout: snapshot files are symlinks into `blobs/`.
    let blobs = repo.join("blobs");
    copy_fixture("qwen2-tiny", &blobs);
    let snapshot = repo.join("snapshots").join(hash);
    fs_err::create_dir_all(&snapshot).expect("snapshot dir");
    for entry in fs_err::read_dir(&blobs).expect("blobs") {
        let name = entry.expect("entry").file_name();
        let target = Path::new("../../blobs").join(&name);
        std::os::unix::fs::symlink(&target, snapshot.join(&name)).expect("symlink");
    }
    fs_err::create_dir_all(repo.join("refs")).expect("refs");
    fs_err::write(repo.join("refs").join("main"), format!("{hash}\n")).expect("ref");
    let opts = LoadOptions {
        hf_cache: Some(cache.path().to_path_buf()),
        ..LoadOptions::default()
    };
    for spec in [
        "hf:tiny-org/qwen2-tiny",
        "hf:tiny-org/qwen2-tiny@main",
        &format!("hf:tiny-org/qwen2-tiny@{hash}"),
    ] {
        let m = load(spec, &opts).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(m.dir.ends_with(hash), "{}", m.dir.display());
        assert_eq!(m.config.architecture, retort_model::Architecture::Qwen2);
    }
    let e = load("hf:tiny-org/missing", &opts)
        .expect_err("missing repo")
        .to_string();
    assert!(
        e.contains("models--tiny-org--missing") && e.contains("hint"),
        "{e}"
    );
    let e = load("hf:tiny-org/qwen2-tiny@v9", &opts)
        .expect_err("missing rev")
        .to_string();
    assert!(e.contains("v9") && e.contains(hash), "{e}");
}

#[test]
fn bad_model_folders_give_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = LoadOptions::default();
    let load_err = |dir: &Path| match load(dir.to_str().expect("utf8"), &opts) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            println!("error: {e}");
            e.to_string()
        }
    };

    let dir = tmp.path().join("no-config");
    copy_fixture("llama-tiny", &dir);
    fs_err::remove_file(dir.join("config.json")).expect("rm");
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("no-config"), "{e}");

    let dir = tmp.path().join("corrupt");
    copy_fixture("llama-tiny", &dir);
    let bytes = fs_err::read(dir.join("model.safetensors")).expect("read");
    fs_err::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("truncate");
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt"),
        "{e}"
    );

    let dir = tmp.path().join("gpt2");
    copy_fixture("llama-tiny", &dir);
    let mut cfg = read_json(&dir.join("config.json"));
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    fs_err::write(dir.join("config.json"), cfg.to_string()).expect("write");
    let e = load_err(&dir);
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
        "{e}"
    );

    // qwen2 is untied, so removing lm_head.weight must fail, naming the tensor and file.
    let dir = tmp.path().join("missing-tensor");
    copy_fixture("qwen2-tiny", &dir);
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    let kept: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| k != "lm_head.weight")
        .collect();
    candle_core::safetensors::save(&kept, &path).expect("save");
    let e = load_err(&dir);
    assert!(
        e.contains("lm_head.weight") && e.contains("model.safetensors"),
        "{e}"
    );

    let dir = tmp.path().join("pickled");
    copy_fixture("llama-tiny", &dir);
    fs_err::rename(dir.join("model.safetensors"), dir.join("pytorch_model.bin")).expect("mv");
    let e = load_err(&dir);
    assert!(
        e.contains("pytorch_model.bin") && e.contains("safetensors"),
        "{e}"
    );

    let e = load_err(&tmp.path().join("does-not-exist"));
    assert!(e.contains("does-not-exist"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_identically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sharded");
    copy_fixture("qwen3-tiny", &dir);
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    fs_err::remove_file(&path).expect("rm");
    let mut shards: [std::collections::HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), Value::String(file));
        shards[i % 2].insert(name, t.to_dtype(candle_core::DType::BF16).expect("bf16"));
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .expect("save");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    fs_err::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let sharded =
        load(dir.to_str().expect("utf8"), &LoadOptions::default()).expect("sharded bf16 loads");
    let (orig, golden) = load_fixture("qwen3-tiny");
    let input = ids(&golden["prompts"][0]["input_ids"]);
    let t = Tensor::new(input.as_slice(), &Device::Cpu)
        .expect("t")
        .unsqueeze(0)
        .expect("b");
    let a: Vec<f32> = orig
        .model
        .forward(&t, None, None)
        .expect("f")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    let b: Vec<f32> = sharded
        .model
        .forward(&t, None, None)
        .expect("f")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    // bf16 weights round to ~3 significant digits; the logits stay close but not equal.
    let d = max_abs_diff(&a, &b);
    println!("sharded bf16 vs f32 logits: max_abs_diff {d:.3e}");
    assert!(d < 0.5, "{d}");
    assert_eq!(sharded.model.dtype(), candle_core::DType::F32);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (m, golden) = load_fixture("qwen2-tiny");
    let prompt = ids(&golden["generation"][0]["prompt_ids"]);
    let other = ids(&golden["generation"][2]["prompt_ids"]);
    let params = |seed: u64| GenerationParams {
        max_new_tokens: 16,
        temperature: 1.0,
        top_p: 0.95,
        top_k: Some(50),
        seed,
        ..GenerationParams::default()
    };
    let run = |prompts: &[Vec<u32>], seed| {
        generate(&m.model, &m.tokenizer, prompts, &params(seed)).expect("gen")
    };
    let a = run(std::slice::from_ref(&prompt), 7);
    let b = run(std::slice::from_ref(&prompt), 7);
    let c = run(std::slice::from_ref(&prompt), 8);
    assert_eq!(a[0].token_ids, b[0].token_ids, "same seed, same ids");
    assert_ne!(
        a[0].token_ids, c[0].token_ids,
        "different seed, different ids"
    );
    // Row 0 does not depend on what else is in the batch.
    let batch = run(&[prompt.clone(), other], 7);
    assert_eq!(
        batch[0].token_ids, a[0].token_ids,
        "row independent of batch"
    );
    // top_k = 1 is greedy whatever the seed.
    let greedy_ids = generate(
        &m.model,
        &m.tokenizer,
        std::slice::from_ref(&prompt),
        &greedy(16, vec![]),
    )
    .expect("g");
    let top1 = GenerationParams {
        top_k: Some(1),
        ..params(3)
    };
    let out = generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), &top1).expect("top1");
    assert_eq!(out[0].token_ids, greedy_ids[0].token_ids);
}

#[test]
fn stop_strings_and_eos_end_rows() {
    let (m, golden) = load_fixture("qwen2-tiny");
    let g = &golden["generation"][0];
    let prompt = ids(&g["prompt_ids"]);
    let want = ids(&g["new_token_ids"]);
    let full_text = g["text_skip_special"].as_str().expect("text");
    // Stop on a token id that greedy decoding produces at position 3.
    let params = greedy(24, vec![want[3]]);
    let out = generate(
        &m.model,
        &m.tokenizer,
        std::slice::from_ref(&prompt),
        &params,
    )
    .expect("gen");
    assert_eq!(out[0].token_ids, want[..4].to_vec(), "EOS kept");
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    // A stop string taken from the middle of the greedy text.
    let chars: Vec<char> = full_text.chars().collect();
    let stop: String = chars[10..13].iter().collect();
    let cut = full_text.find(&stop).expect("stop in text");
    let params = GenerationParams {
        stop_strings: vec![stop.clone()],
        ..greedy(24, vec![])
    };
    let out = generate(
        &m.model,
        &m.tokenizer,
        std::slice::from_ref(&prompt),
        &params,
    )
    .expect("gen");
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    assert_eq!(out[0].text, full_text[..cut], "text cut before {stop:?}");
    assert!(out[0].token_ids.len() < 24 && want.starts_with(&out[0].token_ids));
    // max_new_tokens.
    let out = generate(
        &m.model,
        &m.tokenizer,
        std::slice::from_ref(&prompt),
        &greedy(5, vec![]),
    )
    .expect("gen");
    assert_eq!(out[0].token_ids, want[..5].to_vec());
    assert_eq!(out[0].finish_reason, FinishReason::Length);
}

/// Every weight of `load_trainable` is a Var under its HF name, and the differentiable forward
/// gives each one a non-zero gradient (tied models have no `lm_head.weight`).
#[test]
fn trainable_load_gives_every_weight_a_gradient() {
    for name in MODELS {
        let (m, vars) = retort_model::load_trainable(&fixture(name)).expect("load_trainable");
        let names: Vec<String> = vars.data().lock().expect("lock").keys().cloned().collect();
        assert_eq!(
            names.contains(&"lm_head.weight".to_string()),
            !m.config.tie_word_embeddings,
            "{name}"
        );
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));
        let n_params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
        let golden = read_json(&fixture(name).join("golden.json"));
        assert_eq!(
            n_params as u64,
            golden["num_parameters"].as_u64().expect("n"),
            "{name}: parameter count"
        );
        let seqs = vec![vec![5u32, 6, 7, 8], vec![9, 10]];
        let batch = retort_model::PaddedBatch::left(&seqs, 509, &Device::Cpu).expect("batch");
        let logits = m
            .model
            .forward(
                &batch.input_ids,
                Some(&batch.attention_mask),
                Some(&batch.position_ids),
            )
            .expect("forward");
        let loss = logits.sqr().expect("sqr").mean_all().expect("mean");
        let grads = loss.backward().expect("backward");
        for (var_name, var) in vars.data().lock().expect("lock").iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {var_name}"));
            let norm = g
                .sqr()
                .expect("sqr")
                .sum_all()
                .expect("sum")
                .to_scalar::<f32>()
                .expect("f32");
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient of {var_name} is {norm}"
            );
        }
        println!(
            "{name}: {} vars, {n_params} parameters, all with gradients",
            names.len()
        );
    }
}
