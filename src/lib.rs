//! tokenrelay: a reverse proxy that attaches fresh OAuth tokens from a pool of
//! credentials to requests for the Gemini and Qwen APIs.
//!
//! `main.rs` parses arguments and calls [`run`]; tests call [`App::start`] to run the real
//! application in-process on ports chosen by the OS. See ARCHITECTURE.md for the map.

pub mod clock;
pub mod common;
pub mod config;
pub mod lifecycle;
pub mod oauth;
pub mod ops;
pub mod providers;
pub mod proxy;
pub mod quota;
pub mod store;
pub mod telemetry;
pub mod usage;

mod app;

pub use app::{run, App};
pub use config::Config;
