//! Integration tests of the retort library (one binary to keep link time low).
mod distill;
mod distill_cache;
mod distill_lora;
mod edges;
mod openai;
mod provenance;
mod report;
mod select;
