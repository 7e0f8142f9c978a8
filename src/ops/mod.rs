//! Operations: what operators see and drive. The admin listener (`admin`) and its
//! operator page (`console`), the command line (`cli`: status, refresh, check, usage; `login`:
//! the terminal side of re-authentication), reload without a restart (`reload`) and the
//! log writer. Metrics and alerts, which
//! the lifecycle reports into, live below in `telemetry/`.

pub mod admin;
pub mod cli;
pub mod console;
pub mod login;
pub mod logwriter;
pub mod reload;
pub mod usage;
