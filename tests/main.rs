//! One integration-test binary (one link) with a module per area.

mod helpers;
mod process;

mod admin;
mod alerts;
mod browser;
mod cli;
mod clients;
mod config;
mod console;
mod deploy;
mod failover;
mod fleet;
mod keys;
mod lifecycle;
mod login;
mod passthrough;
mod proxy;
mod quota;
mod recipes;
mod refresh;
mod robustness;
mod security;
mod tls;
mod usage;
mod webdriver;
mod wire;
