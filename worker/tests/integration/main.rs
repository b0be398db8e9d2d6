//! The worker's integration tests, in one binary (each test binary links the
//! whole runtime: one link instead of three).

mod common;
mod fetch;
mod gemma3_gguf;
mod smollm2_gguf;
mod tiny_models;
