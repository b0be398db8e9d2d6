//! What a kandle worker accepts and what it reports, defined once.
//!
//! The operator builds the `ModelDeployment` schema from these types and ranges,
//! and the worker validates its flags and requests with them, so the CRD can
//! never admit a value that a worker refuses at start-up (or the reverse).
//! Both servers (worker and router) also answer request bodies past their limit
//! the same way ([`drain`]), and stop the same way ([`stopping`]).

pub mod command_line;
pub mod drain;
pub mod duration;
pub mod engine;
pub mod http;
pub mod model_info;
pub mod sampling;
mod schema;
pub mod source;
pub mod stopping;

pub use model_info::ModelInfo;
pub use sampling::{Interval, OutOfRange, SamplingDefaults};
pub use source::{SourceError, SourceUrl};
