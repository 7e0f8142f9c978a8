//! tokenrelay: a reverse proxy that attaches fresh OAuth tokens from a pool of
//! credentials to requests for the Gemini and Qwen APIs.
//!
//! `main.rs` parses arguments and calls [`run`]; tests call [`App::start`] to run the real
//! application in-process on ports chosen by the OS. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod alert;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credential;
pub mod error;
pub mod metrics;
pub mod oauth;
pub mod pool;
pub mod proxy;
pub mod retry_after;
pub mod store;
pub mod token;
pub mod upstream;

mod app;
mod server;

pub use app::{run, App};
pub use config::Config;
