//! The credential lifecycle: each credential's token in memory and its state machine
//! (`credential`, `token`, `state`; the `State` and `Snapshot` it reports live in
//! `common::state`), the single-flight refresh under the store's lock (`refresh`), the
//! background schedule and backoff (`schedule`), and the pools that hold credentials per
//! provider (`pool`).
//!
//! This subsystem never sees a client's HTTP request: the proxy asks it for a token and
//! tells it what the upstream answered (a 401 → `replace_token`, a 429 → `cool_down`).

mod cooldown;
mod credential;
pub mod pool;
mod refresh;
mod schedule;
mod state;
mod token;

pub use crate::common::state::{Snapshot, State};
pub use cooldown::{Cool, Gate, Probe};
pub use credential::Refresher;
pub use credential::{Credential, Source};
pub use pool::{looked_at, Pool, ProviderPool};
pub use schedule::backoff;
pub use token::{token_from_file, Expiry, Token};
