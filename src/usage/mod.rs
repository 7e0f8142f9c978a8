//! Usage: the tokens each answer cost, read as the answer streams past (`scan`), and
//! counted per client, model and credential (`meter`).

pub mod clients;
pub mod ledger;
pub mod meter;
pub mod scan;

pub use scan::{Scanner, Usage};
