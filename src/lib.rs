//! kube-uproxy: a userspace L4 proxy for Kubernetes Services.
//!
//! Data flows one way: [`source`] → [`model`] → [`reconcile`] → [`rules`]
//! (nftables redirects) and [`proxy`] (listeners, balancers, relays).

pub mod admin;
pub mod client_metrics;
pub mod config;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod reconcile;
pub mod rules;
pub mod serve;
pub mod source;
pub mod vecmap;
