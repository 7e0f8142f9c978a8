//! One integration-test binary (one link) with a module per area.

mod helpers;

mod admin;
mod config;
mod proxy;
mod refresh;
