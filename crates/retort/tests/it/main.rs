//! Integration tests of the retort library (one binary to keep link time low).
mod distill;
mod distill_cache;
mod distill_lora;
mod edges;
mod openai;
mod provenance;
mod remote_teacher;
mod report;
mod scoring;
mod select;
mod vllm;
