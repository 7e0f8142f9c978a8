//! What the lifecycle and the request path report into: the Prometheus registry
//! (`metrics`) and alert webhooks (`alert`). Below both of them (they import neither) and
//! below `ops/`, which shows and serves what is reported here.

pub mod alert;
pub mod metrics;
