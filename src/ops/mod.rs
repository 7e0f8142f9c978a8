//! Operations: what operators see and drive. The admin listener (`admin`) and its
//! operator page (`console`), the
//! Prometheus registry (`metrics`), alert webhooks (`alert`) and the command line
//! (`cli`: status, refresh, check; `login`: the terminal side of re-authentication).

pub mod admin;
pub mod alert;
pub mod cli;
pub mod console;
pub mod login;
pub mod logwriter;
pub mod metrics;
