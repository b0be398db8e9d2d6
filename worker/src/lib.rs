//! kandle-worker: a candle language model behind an OpenAI-compatible Chat
//! Completions API.

pub mod api;
pub mod auth;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod model;
pub mod resources;
pub mod runtime;
pub mod server;
pub mod service;
pub mod startup;
